"""HLDF on vs off on the tiny base: colour statistics of generated vs real images.

Trains the tiny base twice on a small HyperKvasir subset with identical settings and seed, once
with the HLDF colour loss and once without, then generates images per class (same prompts and
seeds) and compares per-channel colour mean and standard deviation with the real train images
of that class (images in [-1, 1]):

    d_mean = mean over classes and channels |mean_c(generated) - mean_c(real)|   (class averages)
    d_std  = same for the per-image channel standard deviation

Lower is closer. The tiny model is far from PixArt-XL; this shows what the loss does to a small
model in a short run, not the paper's effect size. Results are printed whichever way they go.

    python bench/bench_hldf_colour.py [--steps 120] [--every 4] [--m 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hldf_overhead import subset  # noqa: E402


def class_stats(images, labels, n_classes):
    import torch

    from medsynth.finetune.hldf import colour_stats

    m, s = colour_stats(images)
    labels = torch.as_tensor(labels)
    return (torch.stack([m[labels == c].mean(0) for c in range(n_classes)]),
            torch.stack([s[labels == c].mean(0) for c in range(n_classes)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hyperkvasir")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--gen-steps", type=int, default=10)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--vae-fit", type=int, default=150, help="optimizer steps fitting the tiny VAE (model.tiny.vae_fit_steps)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override (repeatable)")
    args = ap.parse_args()

    import torch

    from medsynth import console, sampling
    from medsynth import data as data_mod
    from medsynth import finetune
    from medsynth.data import read_classes, read_manifest
    from medsynth.finetune import adapters
    from medsynth.finetune.loop import _load_pixels, read_captions
    from medsynth.models import loading
    from medsynth.recipe import load_recipe

    console.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = subset(args.data, tmp / "data", 3, 12)
        results = {}
        real = None
        for hldf_on in (False, True):
            ov = [f"data.root={data}", f"workdir={tmp / 'ws'}", f"model.resolution={args.res}",
                  f"model.tiny.vae_fit_steps={args.vae_fit}", "finetune.batch_size=4", f"finetune.hldf.enabled={str(hldf_on).lower()}",
                  f"finetune.hldf.every_n_steps={args.every}", f"finetune.hldf.steps={args.m}",
                  f"finetune.max_steps={args.steps}", f"finetune.checkpoint_every={args.steps}",
                  f"finetune.sample_every={args.steps}", "seed=0"] + args.set
            r = load_recipe("demo", ov)
            data_mod.run(r)
            out = finetune.run(r)
            classes = read_classes(r.workdir_path)
            rows = read_manifest(r.workdir_path, "train")
            if real is None:
                px = torch.stack([_load_pixels(x.path, r.model.resolution) for x in rows])
                labels = [next(c["index"] for c in classes if c["name"] == x.label) for x in rows]
                real = class_stats(px, labels, len(classes))
            caps = read_captions(r, rows, classes)
            prompts, seeds, labels = [], [], []
            for c in classes:
                cap = [cp for cp, x in zip(caps, rows) if x.label == c["name"]]
                for j in range(args.per_class):
                    prompts.append(cap[j % len(cap)])
                    seeds.append(1000 + j)
                    labels.append(c["index"])
            comps = loading.load_components(r, device="cpu", dtype=torch.float32)
            comps = adapters.apply_finetuned(comps, out)
            from medsynth.models import pixart

            imgs = sampling.generate(pixart.BACKBONE, comps, prompts, seeds, resolution=r.model.resolution,
                                     steps=args.gen_steps, guidance=4.5, max_length=r.model.max_text_tokens)
            gm, gs = class_stats(imgs, labels, len(classes))
            results[hldf_on] = ((gm - real[0]).abs().mean().item(), (gs - real[1]).abs().mean().item(),
                                (gm - real[0]).abs(), (gs - real[1]).abs())
        print(f"tiny base, {args.res} px, {args.steps} steps, batch 4, HLDF every {args.every} steps with M={args.m}; "
              f"{args.per_class} images/class x 3 classes, {args.gen_steps} DPM-Solver++ steps, CFG 4.5")
        print("               d_mean   d_std    (|generated - real| of per-class channel mean / std, [-1,1] scale)")
        for on in (False, True):
            dm, ds, pm, ps = results[on]
            print(f"HLDF {'on ' if on else 'off'}       {dm:.4f}   {ds:.4f}    per channel R,G,B mean: "
                  f"{[round(v, 3) for v in pm.mean(0).tolist()]}  std: {[round(v, 3) for v in ps.mean(0).tolist()]}")


if __name__ == "__main__":
    main()
