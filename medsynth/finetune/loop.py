"""The finetune stage: LoRA (or full) fine-tuning of a backbone's denoiser and text encoder(s) with HLDF, on accelerate.

Design notes (why it is written this way):

- The loop knows no model family: it asks the backbone (``medsynth.models.backbone``) for the
  denoiser, the text encoders, LoRA targets, conditioning (``encode``) and predictions
  (``predict``); docs/architecture.md shows one training step through that interface.
- Gradient accumulation and gradient sync are handled here rather than by
  ``Accelerator.accumulate``: the HLDF step runs a second set of forwards (the M-step sampler)
  on the last micro-batch of an optimizer step, and DDP allows only one forward per backward
  in a synced step. HLDF micro-batches therefore run under ``no_sync`` and their gradients are
  averaged across processes by hand before the optimizer step.
- Data order is a seeded permutation per epoch; micro-batch ``m`` of the run is batch
  ``m % steps_per_epoch`` of epoch ``m // steps_per_epoch``. Resuming at optimizer step ``s``
  restarts at micro-batch ``s * accumulation``: exactly the batches an uninterrupted run sees.
- Noise, timesteps, caption dropout, latent sampling and flips draw from one trainer
  generator, the HLDF sampler from its own; both are saved in checkpoints.
- The LR scheduler is stepped once per optimizer step by us, not through
  ``accelerator.prepare`` (which steps it once per process).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import console, sampling
from ..errors import UserError
from ..workspace import atomic_write_json, ensure_dir, sha256_file, sha256_json, write_provenance
from ..models.backbone import Cond, for_recipe
from . import adapters, checkpoint, hldf, lora

# Images per VAE encode call when the latent cache is built (finetune --dry-run's estimate uses it too).
CACHE_CHUNK = 8
# Settings that must not change between a checkpoint and a resumed run.
RESUME_KEYS = ("adapter", "lora", "batch_size", "gradient_accumulation_steps", "caption_dropout", "label_dropout",
               "ema_decay", "augment")


# ----------------------------------------------------------------------------- data


def _load_pixels(path: str, resolution: int) -> torch.Tensor:
    """Image -> (3, R, R) float in [-1, 1]: shorter side resized to R (bicubic), centre crop."""
    from ..images import read_image, resize_center_crop

    img = resize_center_crop(read_image(path), resolution)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def read_captions(recipe, rows, classes) -> list[str]:
    """Caption per train row from captions.jsonl; the class template (with a warning) when missing."""
    from ..prompts import simple_caption

    path = recipe.workdir_path / "captions.jsonl"
    by_path: dict[str, str] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                    by_path[str(rec["path"])] = str(rec["caption"])
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path}:{i}: not a JSON object with 'path' and 'caption'; rerun `medsynth caption`") from None
    category = {c["name"]: c["category"] for c in classes}
    out, missing = [], 0
    for r in rows:
        cap = by_path.get(str(r.path))
        if cap is None:
            missing += 1
            cap = simple_caption(recipe.modality, category[r.label])
        out.append(cap)
    if not path.is_file():
        console.warn(f"{path} not found: training with the simple class captions "
                     f"('{simple_caption(recipe.modality, classes[0]['category'])}', ...); run `medsynth caption` "
                     f"first for the paper's VLM captions")
    elif missing:
        console.warn(f"{missing} of {len(rows)} train images have no caption in {path}; they use the simple class caption")
    return out


@dataclass
class Data:
    paths: list[str]
    labels: list[int]
    captions: list[str]
    colour_mean: torch.Tensor           # (N, 3) real-image channel means in [-1, 1]
    colour_std: torch.Tensor            # (N, 3)
    latent_params: torch.Tensor | None  # (N, 2C, h, w) VAE posterior mean || logvar, or None (no cache)
    text: object | None                 # cached conditioning (a backbone Cond, N+1 rows) incl. "" at the end


def batch_indices(n: int, global_batch: int, seed: int, epoch: int, b: int, rank: int, per_proc: int) -> list[int]:
    """Indices of batch ``b`` of ``epoch`` for process ``rank``: a seeded permutation, wrapped at the end."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    start = b * global_batch + rank * per_proc
    return [int(perm[(start + i) % n]) for i in range(per_proc)]


# ----------------------------------------------------------------------------- helpers


def _bar(main: bool, iterable=None, **kw):
    """console.progress on the main process; a silent bar elsewhere (one bar per job, not per GPU)."""
    if main:
        return console.progress(iterable, **kw)
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=True, **kw)


def _weight_dtype(mp: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)


def _trainable_state(models: dict) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in models.items():
        if m is None:
            continue
        for n, p in sampling.unwrap(m).named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{n}"] = p
    return out


def _ft_config(recipe) -> dict:
    d = recipe.finetune
    from ..recipe import to_dict

    return {"base": recipe.model.base, "revision": recipe.model.revision, "resolution": recipe.model.resolution,
            "max_text_tokens": recipe.model.max_text_tokens, "seed": recipe.seed, "modality": recipe.modality,
            "finetune": to_dict(d)}


def _make_ema(bb, ft, params):
    """An EMA of the trainable weights for backbones trained from scratch (``bb.ema_decay``), else None.

    diffusers' EMAModel warms the decay up as min(decay, (1 + n) / (10 + n)).
    """
    if bb.ema_decay is None or ft.adapter != "full":
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=bb.ema_decay if ft.ema_decay is None else ft.ema_decay)


def _check_family_keys(bb, ft) -> None:
    """Keys that only some families read: a set value the family would ignore is an error, not a no-op."""
    if ft.ema_decay is not None and bb.ema_decay is None:
        raise UserError(f"finetune.ema_decay is {ft.ema_decay} but model.family '{bb.name}' keeps no weight EMA (only "
                        "families trained from scratch, e.g. dit, do); remove finetune.ema_decay or set it to null")
    if ft.label_dropout is not None and not bb.class_conditional:
        raise UserError(f"finetune.label_dropout is {ft.label_dropout} but model.family '{bb.name}' is conditioned on "
                        "text, not class labels; use finetune.caption_dropout instead and set finetune.label_dropout "
                        "to null")


def _drop_probability(bb, ft) -> float:
    """The chance that a training example is conditioned on the empty prompt / null label."""
    if bb.class_conditional and ft.label_dropout is not None:
        return ft.label_dropout
    return ft.caption_dropout


def _all_reduce_grads(params, accelerator) -> None:
    if accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= accelerator.num_processes


def _make_optimizer(ft, params, device):
    kind = ft.optimizer
    if kind == "auto":
        try:
            import bitsandbytes  # noqa: F401
            kind = "adamw8bit" if device.type == "cuda" else "adamw"
        except ImportError:
            kind = "adamw"
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("finetune.optimizer is 'adamw8bit' but bitsandbytes is not installed; "
                            "`pip install bitsandbytes` (CUDA only) or set finetune.optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=ft.learning_rate, weight_decay=ft.weight_decay), kind
    return torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay), kind


class _Logger:
    def __init__(self, out: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            # A resumed run rewrites history after its checkpoint: drop lines past it.
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        keep.append(line)
                except ValueError:
                    pass
            self.path.write_text("".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            console.info("finetune: tensorboard is not installed; logging to log.jsonl only")

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- the stage


def run(recipe, resume: bool = False, max_steps: int | None = None) -> Path:
    """Fine-tune ``model.base`` on the prepared train split; returns ``<workdir>/finetune``."""
    from ..workspace import require  # a workdir that is not a workspace is refused before any write
    require(recipe)
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from ..data import read_classes, read_manifest
    from ..models import loading

    ft = recipe.finetune
    hc = ft.hldf
    workdir = recipe.workdir_path
    out = workdir / "finetune"
    rows = read_manifest(workdir, "train")
    classes = read_classes(workdir)
    if not rows:
        raise UserError(f"{workdir / 'manifest.csv'} has no train images; rerun `medsynth prepare`")
    label_of = {c["name"]: int(c["index"]) for c in classes}

    device_spec = loading.resolve_device(recipe.model.device)
    cpu = str(device_spec).startswith("cpu")
    mp = ft.mixed_precision
    if cpu and mp == "fp16":
        raise UserError("finetune.mixed_precision is 'fp16' but training runs on the CPU, which has no fp16 autocast; "
                        "set finetune.mixed_precision: bf16 or 'no' (or model.device: cuda)")
    accelerator = Accelerator(mixed_precision=mp, cpu=cpu)
    device = accelerator.device
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    wdtype = _weight_dtype(mp)
    # Global RNGs: LoRA initialisation, T5 / LoRA dropout draw from them. The same on every process,
    # so every rank starts from the same adapter weights.
    from accelerate.utils import set_seed

    set_seed(recipe.seed)

    loading.check_base(recipe)
    bb = for_recipe(recipe)
    _check_family_keys(bb, ft)
    comps = loading.load_components(recipe, device=device, dtype=wdtype)
    transformer, vae = bb.denoiser(comps), comps.vae  # the denoiser (a DiT or a UNet)
    text_encoders = bb.text_encoders(comps)
    vae.to(device=device, dtype=torch.float32).requires_grad_(False).eval()
    sched_config = comps.scheduler.config
    train_sched = bb.training_scheduler(sched_config)
    base_name = getattr(comps, "base", recipe.model.base)

    # ---- adapters
    for te in text_encoders.values():
        te.requires_grad_(False)
    if ft.adapter == "full":
        transformer.requires_grad_(True)
        transformer.to(torch.float32)  # all weights are masters here
        dit_cfg = None
    else:
        dit_cfg = lora.add_lora(transformer, ft.lora, bb.lora_targets("denoiser", ft.lora.transformer_targets),
                                f"{bb.label} {bb.denoiser_part}")
    te_cfgs = {}
    if ft.lora.text_encoder:
        te_cfgs = {name: lora.add_lora(te, ft.lora, bb.lora_targets(name, ft.lora.text_encoder_targets),
                                       f"{bb.label} {name}") for name, te in text_encoders.items()}
    if ft.lora.text_encoder and not text_encoders and not bb.class_conditional and main:
        # A family whose text encoders stay frozen by design: the recipe default (true) is not an error.
        console.warn(f"finetune.lora.text_encoder: true is ignored for model.family '{bb.name}': its text encoders "
                     f"stay frozen (LoRA on the {bb.denoiser_part} only); set it to false to silence this")
    train_te = bool(te_cfgs)
    if ft.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing() if hasattr(vae, "enable_gradient_checkpointing") else None
        for name in te_cfgs:
            text_encoders[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # finetune.base_dropout: whether the frozen base's own dropout (T5 v1.1: 0.1) runs while training.
    lora.set_train_mode(transformer, ft.base_dropout)
    for name, te in text_encoders.items():
        lora.set_train_mode(te, ft.base_dropout) if name in te_cfgs else te.eval()
    params = lora.trainable_parameters(transformer, *text_encoders.values())
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in transformer.parameters()) + sum(
        p.numel() for te in text_encoders.values() for p in te.parameters())

    # ---- data and caches
    # A class-conditional backbone ignores captions: it needs no captions.jsonl (nor a warning about one).
    captions = [""] * len(rows) if bb.class_conditional else read_captions(recipe, rows, classes)
    res = recipe.model.resolution
    lat_hw = res // bb.vae_scale(vae)
    c_lat = bb.latent_channels(comps)
    max_len = recipe.model.max_text_tokens
    cache_latents = ft.cache_latents and ft.augment == "none"
    means, stds, lat_params = [], [], []
    chunk = CACHE_CHUNK
    for i in _bar(main, range(0, len(rows), chunk), desc="finetune: reading images" + (" + VAE cache" if cache_latents else "")):
        px = torch.stack([_load_pixels(r.path, res) for r in rows[i:i + chunk]])
        m, s = hldf.colour_stats(px)
        means.append(m)
        stds.append(s)
        if cache_latents:
            with torch.no_grad():
                lat_params.append(vae.encode(px.to(device)).latent_dist.parameters.float().cpu())
    data = Data([r.path for r in rows], [label_of[r.label] for r in rows], captions, torch.cat(means), torch.cat(stds),
                torch.cat(lat_params) if cache_latents else None, None)
    if not train_te and ft.cache_text:
        # Text encoders frozen: conditioning is a function of the caption alone, so encode each once.
        with torch.no_grad():
            chunks = []
            texts = captions + [""]
            labs = data.labels + [None]  # None: the empty prompt's / null label
            for i in range(0, len(texts), 16):
                chunks.append(bb.encode(comps, texts[i:i + 16], max_len, device, labels=labs[i:i + 16])
                              .to(device="cpu", dtype=wdtype))
            data.text = Cond.cat(chunks)

    n = len(rows)
    per_proc = ft.batch_size
    global_batch = per_proc * world
    steps_per_epoch = math.ceil(n / global_batch)
    accum = ft.gradient_accumulation_steps
    total = max_steps or ft.max_steps or math.ceil(ft.epochs * steps_per_epoch / accum)

    # ---- optimizer, schedule, generators
    optimizer, opt_kind = _make_optimizer(ft, params, device)
    ema = _make_ema(bb, ft, params)
    lr_sched = get_scheduler(ft.lr_scheduler if ft.lr_scheduler != "constant" or ft.warmup_steps == 0 else "constant_with_warmup",
                             optimizer, num_warmup_steps=ft.warmup_steps, num_training_steps=total)
    trained = list(te_cfgs)  # the text encoders carrying LoRA, in the backbone's order
    prepared = accelerator.prepare(transformer, *(text_encoders[k] for k in trained), optimizer)
    transformer, optimizer = prepared[0], prepared[-1]
    text_encoders.update(zip(trained, prepared[1:-1]))
    # The parts the forward passes use (wrapped by accelerate where it prepared them).
    live = comps.replace(**{bb.denoiser_part: transformer}, **text_encoders)
    hldf_seed = recipe.seed if hc.seed is None else hc.seed
    gen = torch.Generator("cpu").manual_seed(recipe.seed * 1000 + rank + 1)
    hgen = torch.Generator("cpu").manual_seed(hldf_seed * 1000 + rank + 7)
    generators = {"trainer": gen, "hldf": hgen}

    ckpt_root = out / "checkpoints"
    step = 0
    fp = _ft_config(recipe)
    if resume:
        last = checkpoint.latest(ckpt_root)
        if last is None:
            console.info(f"finetune: --resume given but {ckpt_root} holds no checkpoint; starting from step 0")
        else:
            ck = checkpoint.load(last, rank)
            st = ck["state"]
            for k in RESUME_KEYS:
                if st["finetune"].get(k) != fp["finetune"].get(k):
                    raise UserError(f"cannot resume from {last}: finetune.{k} was {st['finetune'].get(k)!r} there and is "
                                    f"{fp['finetune'].get(k)!r} now; restore the setting or start afresh without --resume")
            if st.get("base") != fp["base"] or st.get("world") != world:
                raise UserError(f"cannot resume from {last}: it was trained on base {st.get('base')!r} with "
                                f"{st.get('world')} process(es), this run uses {fp['base']!r} with {world}; "
                                f"use the same base and process count or start afresh without --resume")
            named = _trainable_state({bb.denoiser_part: transformer, **{k: text_encoders[k] for k in trained}})
            missing = set(named) ^ set(ck["trainable"])
            if missing:
                raise UserError(f"cannot resume from {last}: its trainable tensors differ from this run's "
                                f"(e.g. {sorted(missing)[:3]}); start afresh without --resume")
            with torch.no_grad():
                for k, p in named.items():
                    p.copy_(ck["trainable"][k].to(p.device, p.dtype))
            optimizer.load_state_dict(ck["optimizer"])
            lr_sched.load_state_dict(ck["scheduler"])
            if ema is not None:
                ema.load_state_dict(torch.load(last / "ema.pt", weights_only=True, map_location="cpu"))
                ema.to(device=device)
            checkpoint.set_rng_state(ck["rng"], generators)
            step = int(st["step"])
            console.info(f"finetune: resumed from {last} (step {step})")
    elif main and out.exists():
        for sub in ("checkpoints", "samples", "tensorboard", "final"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
        (out / "log.jsonl").unlink(missing_ok=True)
        console.info(f"finetune: starting afresh in {out} (earlier outputs removed; use --resume to continue a run)")
    accelerator.wait_for_everyone()
    if main:
        ensure_dir(out)
        ensure_dir(out / "samples")
    logger = _Logger(out, main, step)

    if main:
        console.info(f"finetune: {n} train images, {len(classes)} classes, {steps_per_epoch} batches/epoch x "
                     f"{global_batch} images, {total} optimizer steps; trainable {n_train:,} of {n_total:,} parameters "
                     f"({bb.name} {ft.adapter}{'' if ft.adapter == 'full' else ' ' + ft.lora.transformer_targets}"
                     f"{', text encoder LoRA ' + ft.lora.text_encoder_targets if train_te else ', text encoder frozen'}); "
                     f"optimizer {opt_kind}; "
                     f"HLDF {'every %d steps, M=%d' % (hc.every_n_steps, hc.steps) if hc.enabled else 'off'}; device {device}")

    # Sample-grid prompts: the first caption of each class (fixed), seeds seed+j.
    grid_prompts, grid_seeds, grid_labels = [], [], []
    for c in classes:
        idx = [i for i, lab in enumerate(data.labels) if lab == int(c["index"])]
        cap = data.captions[idx[0]] if idx else ""
        for j in range(ft.samples_per_class):
            grid_prompts.append(cap)
            grid_seeds.append(recipe.seed + j)
            grid_labels.append(int(c["index"]))

    models_for_state = {bb.denoiser_part: transformer, **{k: text_encoders[k] for k in trained}}

    def encode(idx: list[int], drop: torch.Tensor | None, grad: bool):
        texts = [("" if (drop is not None and drop[k]) else data.captions[i]) for k, i in enumerate(idx)]
        if data.text is not None:
            rows_ = [(len(data.captions) if (drop is not None and drop[k]) else i) for k, i in enumerate(idx)]
            return data.text.rows(rows_).to(device)
        labs = [(None if (drop is not None and drop[k]) else data.labels[i]) for k, i in enumerate(idx)]
        with torch.set_grad_enabled(grad), accelerator.autocast():
            return bb.encode(live, texts, max_len, device, labels=labs)

    def latents_for(idx: list[int]) -> torch.Tensor:
        if data.latent_params is not None:
            p = data.latent_params[idx]
        else:
            px = torch.stack([_load_pixels(data.paths[i], res) for i in idx])
            if ft.augment == "hflip":
                flip = torch.rand(len(idx), generator=gen) < 0.5
                px[flip] = px[flip].flip(-1)
            with torch.no_grad():
                p = vae.encode(px.to(device)).latent_dist.parameters.float().cpu()
        mean, logvar = p.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        z = mean + std * torch.randn(mean.shape, generator=gen)
        return (z * vae.config.scaling_factor).to(device)

    def save_checkpoint(at: int) -> None:
        tmp = checkpoint.step_dir(ckpt_root, at).parent / f".step-{at:07d}.tmp"
        if main:
            tmp = checkpoint.begin(ckpt_root, at)
        accelerator.wait_for_everyone()
        checkpoint.write_rng(tmp, rank, generators)
        if main:
            checkpoint.write_main(tmp, _trainable_state(models_for_state), optimizer.state_dict(), lr_sched.state_dict())
            if ema is not None:
                torch.save(ema.state_dict(), tmp / "ema.pt")
        accelerator.wait_for_everyone()
        if main:
            checkpoint.finish(ckpt_root, tmp, at, {"step": at, "base": fp["base"], "world": world,
                                                   "finetune": fp["finetune"], "time": time.time()}, ft.keep_checkpoints)
        accelerator.wait_for_everyone()

    def sample_grid(at: int) -> None:
        if not main:
            return
        tr = sampling.unwrap(transformer)
        tes = {k: sampling.unwrap(v) for k, v in text_encoders.items()}
        tr.eval()
        for te in tes.values():
            te.eval()
        try:
            with accelerator.autocast():
                imgs = sampling.generate(bb, comps.replace(**{bb.denoiser_part: tr}, **tes), grid_prompts, grid_seeds,
                                         resolution=res, steps=recipe.synthesize.steps,
                                         guidance=recipe.synthesize.guidance, max_length=max_len,
                                         batch_size=max(1, ft.batch_size), device=device, dtype=wdtype,
                                         scheduler_config=sched_config, labels=grid_labels)
        finally:
            # Back to the training modes set up above (a plain .train() would switch base dropout on).
            lora.set_train_mode(tr, ft.base_dropout)
            for name, te in tes.items():
                lora.set_train_mode(te, ft.base_dropout) if name in te_cfgs else te.eval()
        from ..workspace import atomic_path

        with atomic_path(out / "samples" / f"step-{at:07d}.png", ".png") as tmp:
            sampling.grid(imgs, len(classes), ft.samples_per_class).save(tmp, format="PNG")

    # ---- training
    pbar = _bar(main, total=total, initial=step, desc="finetune")
    hist = {"loss/diffusion": []}
    t0 = time.time()
    start_step = step
    try:
        while step < total:
            s = step + 1  # the optimizer step being computed (1-based, as the paper counts)
            hldf_now = hc.enabled and s % hc.every_n_steps == 0
            diff_sum = 0.0
            colour = None
            for a in range(accum):
                micro = step * accum + a
                epoch, b = divmod(micro, steps_per_epoch)
                idx = batch_indices(n, global_batch, recipe.seed, epoch, b, rank, per_proc)
                last_micro = a == accum - 1
                sync = last_micro and not hldf_now
                with contextlib.ExitStack() as no_sync:
                    if not sync:
                        no_sync.enter_context(accelerator.no_sync(transformer))
                        for k in trained:
                            no_sync.enter_context(accelerator.no_sync(text_encoders[k]))
                    z0 = latents_for(idx)
                    p_drop = _drop_probability(bb, ft)
                    drop = (torch.rand(len(idx), generator=gen) < p_drop) if p_drop > 0 else None
                    noise = torch.randn(z0.shape, generator=gen).to(device)
                    t = torch.randint(0, train_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
                    zt = train_sched.add_noise(z0, noise, t)
                    cond = encode(idx, drop, train_te)
                    with accelerator.autocast():
                        pred = bb.predict(transformer, zt.to(wdtype), t, cond.to(dtype=wdtype), (res, res))
                    target = sampling.training_target(train_sched, z0, noise, t)
                    loss = F.mse_loss(pred.float(), target.float())
                    accelerator.backward(loss / accum)
                    diff_sum += loss.detach().float().item() / accum
                    if hldf_now and last_micro:
                        cond_h = encode(idx, None, train_te)
                        neg_h = encode([0] * len(idx), torch.ones(len(idx), dtype=torch.bool), train_te)
                        real_lat = z0 if hc.start == "noised_real" else None
                        with accelerator.autocast():
                            r = hldf.hldf_step(bb, transformer, vae, sched_config, hc, cond_h.to(dtype=wdtype),
                                               neg_h.to(dtype=wdtype), data.colour_mean[idx].to(device),
                                               data.colour_std[idx].to(device), hgen, (len(idx), c_lat, lat_hw, lat_hw),
                                               # The DiT's own block checkpointing (when enabled) already
                                               # bounds memory to block inputs per solver step; a second,
                                               # step-level checkpoint would recompute every block twice.
                                               real_latents=real_lat, checkpoint=False,
                                               pixel_size=(res, res))
                        accelerator.backward(r.loss)
                        colour = r
            if hldf_now:
                _all_reduce_grads(params, accelerator)
            # One scalar per process, averaged: every process sees the same value and stops together.
            stats = torch.tensor([diff_sum] + ([colour.color_mean.item(), colour.color_std.item()] if colour else [0.0, 0.0]),
                                 device=device)
            stats = accelerator.reduce(stats, reduction="mean")
            if not torch.isfinite(stats).all():
                last = checkpoint.latest(ckpt_root)
                raise UserError(
                    f"finetune: the loss became {stats.tolist()} (diffusion, colour mean, colour std) at step {s}; "
                    f"training stopped. The last good checkpoint is {last or 'none (no checkpoint written yet)'}. "
                    f"Lower finetune.learning_rate, use finetune.mixed_precision: bf16 instead of fp16, or lower "
                    f"finetune.hldf.weight, then continue with --resume")
            accelerator.clip_grad_norm_(params, ft.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.step(params)
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            step = s
            hist["loss/diffusion"].append(float(stats[0]))
            rec = None
            if step % ft.log_every == 0 or colour is not None or step == total:
                rec = {"step": step, "epoch": (step * accum) // steps_per_epoch, "lr": lr_sched.get_last_lr()[0],
                       "loss/diffusion": sum(hist["loss/diffusion"]) / len(hist["loss/diffusion"]),
                       "time": round(time.time() - t0, 3)}
                if colour is not None:
                    rec.update({"loss/color_mean": float(stats[1]), "loss/color_std": float(stats[2]),
                                "loss/hldf": hldf.hldf_weight(hc) * float(stats[1] + stats[2])})
                logger.log(rec)
                hist["loss/diffusion"] = []
            if main:
                pbar.update(1)
                pbar.set_postfix(loss=f"{float(stats[0]):.4f}")
            if step % ft.checkpoint_every == 0 or step == total:
                save_checkpoint(step)
            if step % ft.sample_every == 0 or step == total:
                sample_grid(step)
    finally:
        pbar.close()
        logger.close()

    # ---- final adapters
    if ema is not None:
        ema.copy_to(params)  # the EMA weights are the final model (checkpoints keep the raw ones)
    if main:
        _write_final(out, recipe, bb, transformer, {k: text_encoders[k] for k in trained}, dit_cfg, te_cfgs, base_name,
                     step)
        inputs = {"manifest.csv": sha256_file(workdir / "manifest.csv")}
        if (workdir / "captions.jsonl").is_file():
            inputs["captions.jsonl"] = sha256_file(workdir / "captions.jsonl")
        write_provenance(out, recipe, "finetune", inputs=inputs, config=fp,
                         extra={"family": bb.name, "steps": step, "resumed_from": start_step or None,
                                "trainable_parameters": n_train,
                                "processes": world, "optimizer": opt_kind, "device": str(device),
                                "adapter_hash": adapters.adapter_hash(out)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _write_final(out: Path, recipe, bb, transformer, text_encoders: dict, dit_cfg, te_cfgs: dict, base_name: str,
                 step: int) -> Path:
    """Write final/ into a temporary directory, then swap it into place.

    ``text_encoders``: the trained ones (part name -> module), ``te_cfgs`` their LoraConfigs.
    """
    tr = sampling.unwrap(transformer)
    tmp = out / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # PEFT folders, one per trained module, named like the base's sub-folders: they load with
    # PeftModel.from_pretrained whatever the family (medsynth.load_finetuned applies them).
    part = bb.denoiser_part
    if dit_cfg is None:
        tr.save_pretrained(str(tmp / part), safe_serialization=True)
    else:
        adapters.save_peft_dir(tr, dit_cfg, tmp / part, base_name, part)
    for name, te in text_encoders.items():
        adapters.save_peft_dir(sampling.unwrap(te), te_cfgs[name], tmp / name, base_name, name)
    if dit_cfg is not None:  # the family's single-file LoRA for its stock loader, where diffusers has one
        bb.write_lora_file(tmp, tr, {k: sampling.unwrap(te) for k, te in text_encoders.items()}, dit_cfg, te_cfgs)
    lc = recipe.finetune.lora
    te_targets = {name: bb.lora_targets(name, lc.text_encoder_targets) for name in te_cfgs}
    info = {
        "family": bb.name,
        "kind": "full" if dit_cfg is None else "lora",
        "base": base_name,
        "denoiser": part,
        "transformer_targets": None if dit_cfg is None else bb.lora_targets("denoiser", lc.transformer_targets),
        # One list for a single text encoder (the common case), part name -> list for several.
        "text_encoder_targets": (None if not te_targets else
                                 next(iter(te_targets.values())) if len(te_targets) == 1 else te_targets),
        "text_encoder": bool(te_cfgs),
        "text_encoders": sorted(te_cfgs),
        "rank": lc.rank, "alpha": lc.alpha, "dora": lc.dora,
        "recipe_hash": sha256_json(_ft_config(recipe)),
        "step": step,
        "resolution": recipe.model.resolution,
    }
    atomic_write_json(tmp / "adapter.json", info)
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


__all__ = ["run", "read_captions", "batch_indices"]
