"""Real-data check: the tiny pipeline on ../shared/data/hyperkvasir and ../shared/data/ham10000.

Runs every stage of the `demo` recipe (tiny base, CPU) on each real data set and prints, per
data set: synthetic-only vs real-only balanced accuracy on the real test split (with chance),
the FID-free scores (KID and domain FID on the workspace's real-only classifier), and the wall
time of each stage. Numbers are whatever this machine measures; nothing is asserted.

    python bench/bench_realdata.py                      # both data sets, demo settings
    python bench/bench_realdata.py --sets hyperkvasir --set finetune.max_steps=3000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["hyperkvasir", "ham10000"])
    ap.add_argument("--work", default="/tmp/medsynth-bench-realdata")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = ap.parse_args()

    from medsynth import console, pipeline
    from medsynth.recipe import load_recipe

    console.set_quiet(True)
    rows = []
    for name in args.sets:
        data = SHARED / name
        if not data.is_dir():
            print(f"{data} missing; skipped", file=sys.stderr)
            continue
        modality = {"hyperkvasir": "endoscopic", "ham10000": "dermoscopic"}.get(name, "medical")
        recipe = load_recipe("demo", [f"data.root={data}", f"workdir={Path(args.work) / name}",
                                      f"modality={modality}", *args.overrides])
        t0 = time.perf_counter()
        results = pipeline.run(recipe)
        total = time.perf_counter() - t0
        wd = recipe.workdir_path
        classes = json.loads((wd / "classes.json").read_text())["classes"]
        syn = json.loads((wd / "classify" / "synthetic" / "metrics.json").read_text())
        real = json.loads((wd / "classify" / "real" / "metrics.json").read_text())
        scores = json.loads((wd / "score" / "scores.json").read_text())
        rows.append((name, len(classes), syn, real, scores, {r.stage: r.seconds for r in results}, total))

    print(f"{'data set':12s} {'C':>2s} {'chance':>6s} {'BA syn':>7s} {'BA real':>7s} {'F1 syn':>7s} {'F1 real':>7s} "
          f"{'KID':>8s} {'dom.FID':>8s}  stage seconds")
    for name, c, syn, real, scores, secs, total in rows:
        st = " ".join(f"{k}={v:.0f}" for k, v in secs.items())
        print(f"{name:12s} {c:2d} {1 / c:6.3f} {syn['balanced_accuracy']:7.3f} {real['balanced_accuracy']:7.3f} "
              f"{syn['f1_macro']:7.3f} {real['f1_macro']:7.3f} {scores.get('kid_inception_mean', scores.get('kid_domain_mean', float('nan'))):8.4f} "
              f"{scores.get('domain_fid', float('nan')):8.2f}  {st} total={total:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
