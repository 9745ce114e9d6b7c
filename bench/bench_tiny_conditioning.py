"""Does the tiny DiT learn images and follow its prompt? Epsilon vs v-prediction, diffusers vs PixArt init.

Why the tiny base predicts v and starts from PixArt-alpha's initialisation (docs/models.md):
this script trains fresh tiny DiTs on the demo data (toy images, the demo recipe's tiny base and
VAE, frozen T5, simple class captions), the same number of steps each, in one process, and
measures for each variant

- ``dc_acc``: a diffusion classifier on the real test split: for every test latent, the class
  whose prompt gives the lowest denoising error over six fixed (timestep, noise) pairs.
  At chance (1 / classes) the model ignores its prompt.
- ``judge_acc``: a ResNet-18 trained on the real train images (same in every variant) labels
  16 samples per class made with DPM-Solver++ (10 steps, CFG 4.5); the share it puts in the
  class that was asked for.

    python bench/bench_tiny_conditioning.py                 # 1,000 steps per variant, ~10 min on 2 cores
    python bench/bench_tiny_conditioning.py --steps 2000 --variants v+pixart

Ratios are against the first variant (PixArt's own setting: epsilon, diffusers init) in the
same invocation. Nothing is asserted; numbers are what this machine measures.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = {
    "eps+diffusers": ("epsilon", False),
    "eps+pixart": ("epsilon", True),
    "v+diffusers": ("v_prediction", False),
    "v+pixart": ("v_prediction", True),
}


def prepared_demo(work: Path):
    """The demo recipe (simple captions) on the toy data in ``work``: prepared, tiny base built."""
    from medsynth import console, data, demo_data
    from medsynth.models import loading
    from medsynth.recipe import load_recipe

    console.set_quiet(True)
    root = demo_data.generate(work / "data")
    r = load_recipe("demo", [f"data.root={root}", f"workdir={work / 'work'}"])
    data.run(r)
    loading.resolve_base(r)
    return r


def train(comps, sched_cfg: dict, pixart: bool, z_params, embeds, masks, steps: int, seed: int, sf: float):
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    from medsynth import sampling
    from medsynth.models import pixart
    from medsynth.models.tiny import pixart_init

    torch.manual_seed(seed)
    dit = PixArtTransformer2DModel.from_config(comps.transformer.config)
    if pixart:
        pixart_init(dit)
    ts = DDPMScheduler.from_config(sched_cfg)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n = len(z_params)
    dit.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (8,), generator=g)
        mean, logvar = z_params[idx].chunk(2, 1)
        z0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)) * sf
        drop = torch.rand(8, generator=g) < 0.1  # caption dropout as the demo, for CFG
        j = torch.where(drop, torch.full_like(idx, n), idx)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        pred = pixart.predict_noise(dit, ts.add_noise(z0, noise, t), t, embeds[j], masks[j])
        loss = F.mse_loss(pred, sampling.training_target(ts, z0, noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
    return dit.eval(), time.perf_counter() - t0


def diffusion_classifier(dit, sched_cfg, comps, z_test, y_test, prompts, max_len) -> float:
    from diffusers import DDPMScheduler

    from medsynth import sampling
    from medsynth.models import pixart

    ts = DDPMScheduler.from_config(sched_cfg)
    g = torch.Generator().manual_seed(123)
    pairs = [(t, torch.randn(z_test.shape, generator=g)) for t in (100, 250, 400, 550, 700, 850)]
    err = torch.zeros(len(z_test), len(prompts))
    with torch.no_grad():
        for c, p in enumerate(prompts):
            e, m = pixart.encode_text(comps.tokenizer, comps.text_encoder, [p], max_len, "cpu")
            e, m = e.expand(len(z_test), -1, -1), m.expand(len(z_test), -1)
            for t, nz in pairs:
                tt = torch.full((len(z_test),), t)
                out = pixart.predict_noise(dit, ts.add_noise(z_test, nz, tt), tt, e, m)
                err[:, c] += (out - sampling.training_target(ts, z_test, nz, tt)).pow(2).flatten(1).mean(1)
    return float((err.argmin(1) == y_test).float().mean())


def train_judge(x, y, n_classes: int):
    import torchvision

    torch.manual_seed(0)
    rng = random.Random(0)
    net = torchvision.models.resnet18(num_classes=n_classes)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    net.train()
    for _ in range(15):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            b = perm[i:i + 32]
            xb = x[b].flip(3) if rng.random() < 0.5 else x[b]
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/medsynth-bench-conditioning")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    from medsynth import sampling
    from medsynth.models import pixart
    from medsynth.data import read_classes, read_manifest
    from medsynth.models import loading
    from medsynth.models.tiny import load_images
    from medsynth.prompts import simple_caption

    r = prepared_demo(Path(args.work))
    comps = loading.load_components(r, device="cpu", dtype="fp32")
    classes = read_classes(r.workdir_path)
    names = [c["name"] for c in classes]
    prompts = [simple_caption(r.modality, c.get("category") or c["name"]) for c in classes]
    train_rows, test_rows = read_manifest(r.workdir_path, "train"), read_manifest(r.workdir_path, "test")
    y_train = torch.tensor([names.index(x.label) for x in train_rows])
    y_test = torch.tensor([names.index(x.label) for x in test_rows])
    res, max_len = r.model.resolution, r.model.max_text_tokens
    x_train = load_images([x.path for x in train_rows], res)
    x_test = load_images([x.path for x in test_rows], res)
    vae, sf = comps.vae, comps.vae.config.scaling_factor
    with torch.no_grad():
        z_params = vae.encode(x_train).latent_dist.parameters
        z_test = vae.encode(x_test).latent_dist.mode() * sf
        texts = [prompts[int(k)] for k in y_train] + [""]
        embeds, masks = pixart.encode_text(comps.tokenizer, comps.text_encoder, texts, max_len, "cpu")
    judge = train_judge(x_train, y_train, len(names))
    with torch.no_grad():
        judge_real = float((judge(x_test).argmax(1) == y_test).float().mean())

    rows = []
    for name in args.variants:
        pred_type, pixart = VARIANTS[name]
        sched_cfg = {**comps.scheduler.config, "prediction_type": pred_type}
        dit, secs = train(comps, sched_cfg, pixart, z_params, embeds, masks, args.steps, args.seed, sf)
        dc = diffusion_classifier(dit, sched_cfg, comps, z_test, y_test, prompts, max_len)
        per = 16
        with torch.no_grad():
            imgs = sampling.generate(pixart.BACKBONE, comps.replace(transformer=dit, vae=vae),
                                     [p for p in prompts for _ in range(per)], [1000 + j for _ in prompts for j in range(per)],
                                     resolution=res, steps=10, guidance=4.5, max_length=max_len, batch_size=16,
                                     device="cpu", dtype=torch.float32, scheduler_config=sched_cfg)
            asked = torch.arange(len(prompts)).repeat_interleave(per)
            judge_acc = float((judge(imgs).argmax(1) == asked).float().mean())
        rows.append((name, dc, judge_acc, secs))
        print(f"{name}: done in {secs:.0f} s", file=sys.stderr)

    chance = 1 / len(names)
    print(f"demo data, {len(train_rows)} train / {len(test_rows)} test images, {len(names)} classes (chance {chance:.3f}), "
          f"{args.steps} steps x batch 8; judge accuracy on real test images {judge_real:.3f}")
    print(f"{'variant':16s} {'dc_acc':>7s} {'judge_acc':>9s} {'train s':>8s} {'dc ratio':>9s} {'judge ratio':>11s}")
    base = rows[0]
    for name, dc, ja, secs in rows:
        print(f"{name:16s} {dc:7.3f} {ja:9.3f} {secs:8.0f} {dc / max(base[1], 1e-9):9.2f} {ja / max(base[2], 1e-9):11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
