"""Every model family's tiny variant on one real data set, under one budget (GitHub issue 11).

For each family (default: every family registered in this version, ``medsynth.models.backbone.REGISTRY``)
this runs every stage of the ``demo`` recipe in-process (``medsynth.pipeline.run``, as
bench_realdata.py) with

    model.family=F model.base=tiny data.root=../shared/data/hyperkvasir workdir=<work>/<F> modality=endoscopic

and prints one table: synthetic-only and real-only balanced accuracy on the real test split and
their ratio, KID (the column names its feature space, e.g. ``KID[domain]``), domain FID, colour
error (score's colour fidelity entries over all classes: mean |real - synthetic| of the per-channel
RGB means, and the 1-Wasserstein distance of the HSV-saturation histograms) and the seconds of each
stage. The split is the usual one (stratified 80/20 per class, seeded). Numbers are whatever this
machine measures; nothing is asserted.

What "the same budget" means here. The tiny variants are built in code from random weights, so a
LoRA on a frozen tiny denoiser would adapt noise: it measures nothing about the family. Every
family therefore trains its whole denoiser (``finetune.adapter=full``, the demo recipe's setting)
for the same ``finetune.max_steps`` at the same batch size and learning rate, with the same HLDF
schedule, caption dropout, synthesis (``synthesize.per_class``, sampler steps) and classifier
(``classify.epochs``): the same number of training images seen and the same number of synthetic
images per class. The text side follows the paper's protocol: LoRA on the text encoder(s) for the
text-to-image families (pixart: T5; sd: CLIP; sdxl: both CLIPs), none for hunyuan-dit (the paper
tunes its DiT only) and none for dit (class labels, no text encoder). Steps are equal, compute is
not: the families' tiny denoisers differ in size and cost per step, which the seconds columns show.
Any ``--set`` given on the command line applies to every family (after the family's own settings),
so ``--set finetune.max_steps=3000`` changes the budget for all of them alike.

    python bench/bench_families.py                                      # every registered family, demo budget
    python bench/bench_families.py --families pixart dit --set finetune.max_steps=3000
    nice -n 19 env OMP_NUM_THREADS=1 python bench/bench_families.py --classes 3 \\
        --set finetune.max_steps=4 --set synthesize.per_class=4 --set classify.epochs=1   # smoke test, minutes
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hyperkvasir"
STAGES = ("prepare", "caption", "finetune", "synthesize", "classify", "score")

# Family-specific settings on top of the demo recipe (see the docstring: why every denoiser is trained in full).
FAMILY_SETTINGS: dict[str, list[str]] = {
    "pixart": ["finetune.adapter=full", "finetune.lora.text_encoder=true"],
    "sd": ["finetune.adapter=full", "finetune.lora.text_encoder=true"],
    "sdxl": ["finetune.adapter=full", "finetune.lora.text_encoder=true"],
    "hunyuan-dit": ["finetune.adapter=full", "finetune.lora.text_encoder=false"],
    "dit": ["finetune.adapter=full", "finetune.lora.text_encoder=false"],
    # Gemma-2 stays frozen (Sana's LoRA loader takes the transformer only). Its tiny base has a random DC-AE
    # (model.tiny.autoencoder does not apply): its row measures the code path, not what Sana can do.
    "sana": ["finetune.adapter=full", "finetune.lora.text_encoder=false"],
}


def _class_override(root: Path, n: int) -> list[str]:
    """``classes=[...]`` naming the first n class folders (sorted): a smaller, quicker run."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if n < 2 or n > len(folders):
        raise SystemExit(f"--classes {n}: {root} has {len(folders)} class folders; give 2..{len(folders)}")
    return ["classes=[" + ", ".join(f"{{name: {f}}}" for f in folders[:n]) + "]"]


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and its finished children.

    Wall seconds on a shared 2-core machine measure the neighbours as much as the work; CPU seconds
    do not (with OMP_NUM_THREADS=1 they are close to the wall time of an idle machine)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _row(recipe, results, seconds: float, cpu: float) -> dict:
    wd = recipe.workdir_path
    classes = json.loads((wd / "classes.json").read_text())["classes"]
    syn = json.loads((wd / "classify" / "synthetic" / "metrics.json").read_text())
    real = json.loads((wd / "classify" / "real" / "metrics.json").read_text())
    sc = json.loads((wd / "score" / "scores.json").read_text())
    kid_key = next(k for k in sc if k.startswith("kid_") and k.endswith("_mean"))
    colour = sc["colour"]["overall"]
    return {
        "classes": len(classes),
        "ba_synthetic": syn["balanced_accuracy"], "ba_real": real["balanced_accuracy"],
        "f1_synthetic": syn.get("f1_macro"),
        "kid_space": kid_key[len("kid_"):-len("_mean")], "kid": sc[kid_key], "kid_features": sc.get("kid_features"),
        "domain_fid": sc.get("domain_fid"),
        "colour_mean_abs_diff_rgb": sum(colour["mean_abs_diff_rgb"]) / 3,
        "colour_w1_saturation": colour["w1_saturation"],
        "stages": {r.stage: r.seconds for r in results}, "skipped": [r.stage for r in results if r.status == "skipped"],
        "total": seconds, "cpu": cpu,
    }


def _f(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", help="families to run (default: every registered family)")
    ap.add_argument("--data", default=str(DATA), help="image-folder data set (default: ../shared/data/hyperkvasir)")
    ap.add_argument("--classes", type=int, help="use only the first N class folders (sorted): a quicker run")
    ap.add_argument("--work", default="/tmp/medsynth-bench-families", help="parent of the per-family workdirs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for every family")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    from medsynth import console, pipeline
    from medsynth.models import backbone
    from medsynth.recipe import load_recipe

    data = Path(args.data)
    if not data.is_dir():
        print(f"{data} missing: give --data DIR", file=sys.stderr)
        return 1
    families = args.families or [f for f in backbone.FAMILIES if f in backbone.REGISTRY]
    classes = _class_override(data, args.classes) if args.classes else []
    console.set_quiet(True)
    rows = []
    for fam in families:
        if fam not in backbone.REGISTRY:
            rows.append({"family": fam, "error": "not available in this version of medsynth"})
            print(f"{fam}: not available in this version; skipped", file=sys.stderr)
            continue
        sets = [f"model.family={fam}", "model.base=tiny", f"data.root={data}", f"workdir={Path(args.work) / fam}",
                "modality=endoscopic", *classes, *FAMILY_SETTINGS.get(fam, ["finetune.adapter=full"]), *args.overrides]
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            recipe = load_recipe("demo", sets)
            results = pipeline.run(recipe)
            rows.append({"family": fam, "overrides": sets, **_row(recipe, results, time.perf_counter() - t0, _cpu_seconds() - c0)})
        except Exception as e:  # one family failing must not hide the others' numbers
            traceback.print_exc()
            rows.append({"family": fam, "overrides": sets, "error": f"{type(e).__name__}: {e}"})
        print(f"{fam}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    spaces = sorted({r["kid_space"] for r in rows if "kid_space" in r}) or ["?"]
    kid_head = f"KID[{'/'.join(spaces)}]"
    print(f"{'family':12s} {'C':>2s} {'BA syn':>7s} {'BA real':>7s} {'ratio':>6s} {kid_head:>12s} {'dom.FID':>8s} "
          f"{'col.dRGB':>8s} {'W1 sat':>7s}  " + " ".join(f"{s[:5]:>5s}" for s in STAGES) + "  total    cpu")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:12s} failed: {r['error']}")
            continue
        ratio = r["ba_synthetic"] / r["ba_real"] if r["ba_real"] else float("nan")
        st = " ".join(f"{'-':>5s}" if s in r["skipped"] else f"{r['stages'].get(s, 0.0):5.0f}" for s in STAGES)
        print(f"{r['family']:12s} {r['classes']:2d} {r['ba_synthetic']:7.3f} {r['ba_real']:7.3f} {ratio:6.3f} "
              f"{_f(r['kid'], '12.4f')} {_f(r['domain_fid'], '8.2f')} {r['colour_mean_abs_diff_rgb']:8.4f} "
              f"{r['colour_w1_saturation']:7.4f}  {st}  {r['total']:5.0f}  {r['cpu']:5.0f}")
    print("BA: balanced accuracy on the real test split (chance = 1/C); col.dRGB: mean |real - synthetic| of the "
          "per-channel RGB means (pixel values in [0, 1]); W1 sat: 1-Wasserstein distance of the HSV-saturation "
          "histograms; wall seconds per stage, '-' = skipped (outputs of an earlier run with the same settings); "
          "total: wall seconds; cpu: CPU seconds of all threads.")
    if args.json:
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1, default=str))
        tmp.replace(args.json)
    return 1 if any("error" in r and r["error"] != "not available in this version of medsynth" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
