"""Synthesis throughput: medsynth's engine vs a plain PixArtAlphaPipeline(prompt) loop.

Same tiny model (the recipe's `model.base: tiny`, built in a workspace), same steps, guidance,
resolution and number of images. The baseline is what a user script does: one call per image,
``pipe(prompt, ...)``, so T5 encodes the prompt (and the empty negative prompt) every call and
every denoising step runs a batch of 2 (CFG). medsynth encodes each distinct prompt once and
runs ``synthesize.batch_size`` images per call. (``clean_caption=False`` in the baseline: the
default needs beautifulsoup4 + ftfy, and without them diffusers warns and skips it anyway.)

    python bench/bench_synthesize.py                 # tiny 64 px model, 48 images, 20 steps
    python bench/bench_synthesize.py --images 96 --batch-size 16 --repeats 3

Timings are wall-clock on whatever else the machine is doing; the two methods are interleaved
(A B A B ...) and the median of the repeats is reported so a burst of load hits both.
It also reports one end-to-end `synthesize.run` (model load + PNG encoding + shard writing).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def build_workspace(tmp: Path, dataset: str, n_classes: int, per_class: int, resolution: int, vae_fit_steps: int) -> Path:
    root = SHARED / dataset
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())[:n_classes]
    manifest = tmp / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for c in classes:
            for p in sorted((root / c).iterdir())[:per_class]:
                w.writerow([str(p), c])
    recipe = tmp / "bench.yaml"
    recipe.write_text(f"""# python bench/bench_synthesize.py
name: bench-synth
workdir: {tmp / 'ws'}
seed: 0
modality: endoscopic
data: {{manifest: {manifest}}}
model:
  base: tiny
  resolution: {resolution}
  dtype: fp32
  device: cpu
  tiny: {{vae_fit_steps: {vae_fit_steps}}}
synthesize: {{prompt_source: simple, shard_size: 1000}}
""")
    return recipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images per method and repeat")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dataset", default="hyperkvasir")
    ap.add_argument("--vae-fit-steps", type=int, default=50)
    ap.add_argument("--workspace", help="directory for the bench workspace (reused: the tiny base is built once)")
    args = ap.parse_args()

    import torch

    from medsynth import data, synthesize
    from medsynth.models.loading import load_components
    from medsynth.recipe import load_recipe
    from medsynth.synthesize.engine import Engine
    from medsynth.synthesize.plan import make_plan

    tmp = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="bench-synth-"))
    tmp.mkdir(parents=True, exist_ok=True)
    recipe_path = build_workspace(tmp, args.dataset, 3, 6, args.resolution, args.vae_fit_steps)
    overrides = [f"synthesize.steps={args.steps}", f"synthesize.guidance={args.guidance}",
                 f"synthesize.batch_size={args.batch_size}"]
    r = load_recipe(recipe_path, overrides)
    data.run(r)
    classes = data.read_classes(r.workdir_path)
    per_class = -(-args.images // len(classes))
    plan = make_plan(r, classes, per_class=per_class)
    samples = plan.samples()[: args.images]
    from medsynth.prompts import simple_caption

    prompt_of = {c["name"]: simple_caption(r.modality, c["category"]) for c in classes}
    prompts = {s.key: prompt_of[s.label] for s in samples}

    comps = load_components(r, parts=("transformer", "text_encoder", "tokenizer", "vae", "scheduler"),
                            device="cpu", dtype=torch.float32)
    engine = Engine(comps, resolution=r.model.resolution, steps=args.steps, guidance=args.guidance,
                    negative_prompt="", max_text_tokens=r.model.max_text_tokens, device="cpu", dtype=torch.float32)
    # The baseline pipeline: the very same modules and scheduler type, called the plain way.
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    plain = PixArtAlphaPipeline(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
                                transformer=comps.transformer,
                                scheduler=DPMSolverMultistepScheduler.from_config(comps.scheduler.config,
                                                                                  algorithm_type="dpmsolver++"))
    plain.set_progress_bar_config(disable=True)

    def run_medsynth() -> float:
        engine._cache.clear()  # count T5 work in every repeat
        t = time.perf_counter()
        for b in range(0, len(samples), args.batch_size):
            engine.generate(samples[b:b + args.batch_size], prompts)
        return time.perf_counter() - t

    def run_plain() -> float:
        t = time.perf_counter()
        for s in samples:
            g = torch.Generator("cpu").manual_seed(s.seed)
            plain(prompts[s.key], num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=r.model.resolution, width=r.model.resolution, generator=g,
                  use_resolution_binning=False, max_sequence_length=r.model.max_text_tokens, clean_caption=False)
        return time.perf_counter() - t

    # Warm-up (first-call allocations, oneDNN kernel selection).
    engine.generate(samples[: min(2, len(samples))], prompts)
    plain(prompts[samples[0].key], num_inference_steps=2, height=r.model.resolution, width=r.model.resolution,
          use_resolution_binning=False, max_sequence_length=r.model.max_text_tokens, clean_caption=False)
    ms, pl = [], []
    for i in range(args.repeats):
        ms.append(run_medsynth())
        pl.append(run_plain())
        print(f"repeat {i + 1}/{args.repeats}: medsynth {ms[-1]:.1f} s, plain loop {pl[-1]:.1f} s", file=sys.stderr, flush=True)
    n = len(samples)
    ips_m, ips_p = n / statistics.median(ms), n / statistics.median(pl)

    t = time.perf_counter()
    import shutil

    shutil.rmtree(tmp / "out", ignore_errors=True)
    out = synthesize.run(r, per_class=per_class, out=tmp / "out", base_only=True)
    e2e = time.perf_counter() - t
    total = plan.total

    print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"model: tiny PixArt ({sum(p.numel() for p in comps.transformer.parameters()) / 1e6:.2f} M DiT params), "
          f"{r.model.resolution} px, {args.steps} DPM-Solver++ steps, CFG {args.guidance}")
    print(f"images per method and repeat: {n}; repeats: {args.repeats} (median)")
    print(f"plain PixArtAlphaPipeline(prompt) loop : {ips_p:8.2f} images/s   (runs: {', '.join(f'{x:.2f}s' for x in pl)})")
    print(f"medsynth engine, batch {args.batch_size:<3d}           : {ips_m:8.2f} images/s   (runs: {', '.join(f'{x:.2f}s' for x in ms)})")
    print(f"speed-up: {ips_m / ips_p:.2f}x")
    print(f"end-to-end `synthesize.run` ({total} images, incl. model load, PNG, shards): {total / e2e:.2f} images/s "
          f"({e2e:.1f} s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
