"""Per-step cost of an HLDF step vs a plain diffusion step (tiny base, CPU) and the implied overhead.

Runs the real finetune stage (`medsynth.finetune.run`) on a small subset of HyperKvasir with the
tiny base, HLDF every 2nd optimizer step, and reads the per-step wall time from log.jsonl.
The overhead of HLDF every N steps is  (t_hldf - t_plain) / (N * t_plain),
reported for the paper's N=500, M=20 (paper: +9% training time on Kvasir).

    python bench/bench_hldf_overhead.py [--data ../shared/data/hyperkvasir] [--steps 20] [--m 20]

Timings on a shared CPU are noisy; the script reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    for d in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / d.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(d.iterdir())[:per_class]:
            (dst / d.name / f.name).symlink_to(f.resolve())
    return dst


def step_times(log: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    out, prev = {}, None
    for r in recs:
        if prev is not None and r["step"] == prev["step"] + 1:
            out[r["step"]] = r["time"] - prev["time"]
        prev = r
    return out


def measure(work: Path, data: Path, steps: int, m: int, extra: list[str]) -> tuple[float, float]:
    from medsynth import data as data_mod
    from medsynth import finetune
    from medsynth.recipe import load_recipe

    # The VAE is left unfitted: fitting does not change the cost of a step.
    ov = [f"data.root={data}", f"workdir={work}", "model.resolution=64", "model.tiny.vae_fit_steps=0",
          "finetune.batch_size=4", "finetune.hldf.enabled=true", "finetune.hldf.every_n_steps=2",
          f"finetune.hldf.steps={m}", "finetune.log_every=1", f"finetune.checkpoint_every={steps + 10}",
          f"finetune.sample_every={steps + 10}", f"finetune.max_steps={steps}"] + extra
    r = load_recipe("demo", ov)
    data_mod.run(r)
    finetune.run(r)
    t = step_times(work / "finetune" / "log.jsonl")
    warm = {k: v for k, v in t.items() if k > 2}  # the first steps include lazy initialisation
    plain = statistics.median(v for k, v in warm.items() if k % 2 == 1)
    hl = statistics.median(v for k, v in warm.items() if k % 2 == 0)
    return plain, hl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hyperkvasir")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--k", type=int, default=4, help="grad_last_k of the bounded variant")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override (repeatable)")
    args = ap.parse_args()
    from medsynth import console

    console.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = subset(args.data, tmp / "data", 3, 8)
        print(f"tiny base, 64 px, batch 4, CPU; M={args.m}, CFG 4.5; median over {args.steps // 2 - 1} steps each")
        for name, extra in (("HLDF, grad through all M steps", []),
                            (f"HLDF, grad through last K={args.k} steps", [f"finetune.hldf.grad_last_k={args.k}"])):
            plain, hl = measure(tmp / "ws", data, args.steps, args.m, extra + args.set)
            ratio = hl / plain
            overhead = (hl - plain) / (args.n * plain)
            print(f"{name:38s} plain step {plain * 1000:7.1f} ms   HLDF step {hl * 1000:8.1f} ms   "
                  f"ratio {ratio:5.1f}x   implied overhead at N={args.n}: {overhead * 100:+.1f}%")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
