"""Real-data check: the tiny pipeline on ../shared/data/hyperkvasir and ../shared/data/ham10000, with and without curation.

Runs every stage of the `demo` recipe (tiny base, CPU) on each real data set, then runs it again
in the same workspace with ``synthesize.curate.enabled=true`` (prepare, caption and finetune are
unchanged and skipped; synthesize, classify and score run again), and prints one table: per data
set and curation setting, synthetic-only vs real-only balanced accuracy on the real test split and
their ratio, macro F1, KID and domain FID, recall and coverage on the domain features, and the
wall time of each stage. HAM10000 is split by lesion (``data.group_by=lesion_id`` from its
labels.csv), so no lesion is in both splits. Numbers are whatever this machine measures; nothing
is asserted.

    python bench/bench_realdata.py                      # both data sets, demo settings
    python bench/bench_realdata.py --sets hyperkvasir --set finetune.max_steps=3000
    python bench/bench_realdata.py --no-curation        # the plain pipeline only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


GROUP_BY = {"ham10000": "lesion_id"}  # several images per lesion: a per-image split leaks


def _row(recipe, results, seconds: float) -> dict:
    wd = recipe.workdir_path
    classes = json.loads((wd / "classes.json").read_text())["classes"]
    syn = json.loads((wd / "classify" / "synthetic" / "metrics.json").read_text())
    real = json.loads((wd / "classify" / "real" / "metrics.json").read_text())
    scores = json.loads((wd / "score" / "scores.json").read_text())
    index = json.loads((wd / "synthetic" / "index.json").read_text())
    return {"classes": len(classes), "syn": syn, "real": real, "scores": scores,
            "curation": index.get("curation"), "stages": {r.stage: r.seconds for r in results}, "total": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["hyperkvasir", "ham10000"])
    ap.add_argument("--work", default="/tmp/medsynth-bench-realdata")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    ap.add_argument("--no-curation", action="store_true", help="skip the second, curated run")
    ap.add_argument("--json", help="also write the rows to this JSON file")
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
        base = [f"data.root={data}", f"workdir={Path(args.work) / name}", f"modality={modality}"]
        if name in GROUP_BY:
            base.append(f"data.group_by={GROUP_BY[name]}")
        t_set = time.perf_counter()
        for curated in ([False] if args.no_curation else [False, True]):
            recipe = load_recipe("demo", [*base, f"synthesize.curate.enabled={str(curated).lower()}", *args.overrides])
            t0 = time.perf_counter()
            results = pipeline.run(recipe)
            rows.append({"set": name, "curated": curated, **_row(recipe, results, time.perf_counter() - t0)})
            print(f"{name} curated={curated}: done in {time.perf_counter() - t0:.0f} s "
                  f"(data set so far {time.perf_counter() - t_set:.0f} s)", file=sys.stderr, flush=True)

    print(f"{'data set':12s} {'curated':>7s} {'C':>2s} {'chance':>6s} {'BA syn':>7s} {'BA real':>7s} {'ratio':>6s} "
          f"{'F1 syn':>7s} {'KID':>8s} {'dom.FID':>8s} {'recall':>6s} {'cover':>6s}  stage seconds")
    for r in rows:
        syn, real, sc, c = r["syn"], r["real"], r["scores"], r["classes"]
        kid = sc.get("kid_inception_mean", sc.get("kid_domain_mean", float("nan")))
        st = " ".join(f"{k}={v:.0f}" for k, v in r["stages"].items() if v >= 0.5)
        print(f"{r['set']:12s} {str(r['curated']):>7s} {c:2d} {1 / c:6.3f} {syn['balanced_accuracy']:7.3f} "
              f"{real['balanced_accuracy']:7.3f} {syn['balanced_accuracy'] / real['balanced_accuracy']:6.3f} "
              f"{syn['f1_macro']:7.3f} {kid:8.4f} {sc.get('domain_fid', float('nan')):8.2f} "
              f"{sc.get('recall_domain') or float('nan'):6.3f} {sc.get('coverage_domain') or float('nan'):6.3f}  "
              f"{st} total={r['total']:.0f}")
        if r["curation"]:
            per = r["curation"].get("classes") or r["curation"].get("per_class") or {}
            if isinstance(per, dict):
                acc = ", ".join(f"{k} {v.get('acceptance_rate') or float('nan'):.2f}" for k, v in per.items() if isinstance(v, dict))
                print(f"{'':12s} curation acceptance: {acc}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
