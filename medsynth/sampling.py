"""DPM-Solver++ sampling with classifier-free guidance in one batch, for any backbone.

The loop knows no model family: conditioning comes from ``backbone.encode`` as a
:class:`~medsynth.models.backbone.Cond`, predictions from ``backbone.predict``. One loop serves
two callers:

- HLDF (finetune): ``denoise(..., grad=True)`` keeps the autograd graph so the colour loss on
  the decoded images reaches the LoRA weights of the denoiser and text encoder. The stock
  diffusers pipelines decorate ``__call__`` with ``torch.no_grad()`` (an outer ``enable_grad``
  does not undo it), so they cannot be used for this; the loop here is small and calls the stock,
  differentiable ``DPMSolverMultistepScheduler.step``.
- Sample grids and synthesis: ``generate(...)`` runs the same loop under ``torch.no_grad``.

A fresh scheduler is made for every call because DPM-Solver++ keeps the previous model
outputs as state; reusing one object across calls would mix two trajectories.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unwrap(model):
    """The plain module behind DDP / torch.compile wrappers (their .config lives on the inner model)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_scheduler(scheduler_config, steps: int, device=None):
    """A fresh DPMSolverMultistepScheduler with ``steps`` timesteps (state reset)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, device=device)
    return sched


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to output for ``add_noise(latents, noise, timesteps)``.

    Follows ``scheduler.config.prediction_type`` (epsilon for most bases; the tiny base: v), the
    same setting the diffusers samplers read, so training and sampling cannot disagree.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    if kind == "flow_prediction":
        # Rectified flow: x_t = (1 - sigma) x0 + sigma noise, the model predicts the velocity noise - x0.
        return noise - latents
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use epsilon, v_prediction, sample or flow_prediction")


def denoise(backbone, model, scheduler_config, latents: torch.Tensor, cond, neg_cond, *, steps: int,
            guidance: float, start_index: int = 0, grad: bool = False, grad_last_k: int | None = None,
            checkpoint: bool = False, pixel_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Run DPM-Solver++ from ``latents`` (already noised to timestep ``start_index``) to t=0.

    ``model`` is ``backbone``'s denoiser, ``cond`` / ``neg_cond`` its conditioning (``Cond``; no
    CFG when ``neg_cond`` is None or ``guidance`` <= 1). CFG uses one batch of 2B (unconditional
    first, as diffusers does). With ``grad`` the graph is kept; ``grad_last_k`` detaches
    everything before the last K solver steps (bounded memory, gradient only through the final
    steps); ``checkpoint`` recomputes each solver step's denoiser forward in backward so memory
    grows by one latent per step rather than one activation set.
    """
    from .models.backbone import Cond

    sched = make_scheduler(scheduler_config, steps, latents.device)
    if start_index:
        sched.set_begin_index(start_index)
    timesteps = sched.timesteps[start_index:]
    do_cfg = guidance > 1.0 and neg_cond is not None
    ctx = Cond.cat([neg_cond, cond]) if do_cfg else cond
    n = len(timesteps)
    first_grad = max(0, n - grad_last_k) if (grad and grad_last_k) else 0

    def one(x, t):
        inp = torch.cat([x, x]) if do_cfg else x
        inp = sched.scale_model_input(inp, t)
        eps = backbone.predict(model, inp, t, ctx, pixel_size)
        if do_cfg:
            uncond, cond_ = eps.chunk(2)
            eps = uncond + guidance * (cond_ - uncond)
        return eps

    for i, t in enumerate(timesteps):
        track = grad and i >= first_grad
        with torch.set_grad_enabled(track):
            if track and i == first_grad and first_grad > 0:
                latents = latents.detach()
            if track and checkpoint:
                eps = torch.utils.checkpoint.checkpoint(one, latents, t, use_reentrant=False)
            else:
                eps = one(latents, t)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
    return latents


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (not clamped, so gradients survive at saturated pixels)."""
    vae_dtype = next(vae.parameters()).dtype
    z = latents.to(vae_dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    return vae.decode(z, return_dict=False)[0]


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """One CPU generator per image, so an image depends on its seed only, not on batch composition."""
    out = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


@torch.no_grad()
def generate(backbone, comps, prompts: Sequence[str], seeds: Sequence[int], *, resolution: int, steps: int = 20,
             guidance: float = 4.5, max_length: int = 120, negative_prompt: str = "", batch_size: int = 8,
             device=None, dtype=None, scheduler_config=None, labels: Sequence[int] | None = None) -> torch.Tensor:
    """Images for ``prompts`` (one per prompt, noise from ``seeds``), float32 in [-1, 1], on CPU.

    ``labels``: the class index per prompt, for class-conditional backbones (the negative is the null label).

    ``comps`` holds the backbone's parts (denoiser, text encoders, tokenizers, vae, and the
    scheduler whose config is used unless ``scheduler_config`` is given).
    """
    model = backbone.denoiser(comps)
    tr = unwrap(model)
    device = device or next(tr.parameters()).device
    dtype = dtype or next(tr.parameters()).dtype
    c = backbone.latent_channels(comps)
    lat = resolution // backbone.vae_scale(comps.vae)
    if scheduler_config is None:
        scheduler_config = comps.scheduler.config
    sched0 = make_scheduler(scheduler_config, steps, device)
    outs = []
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i:i + batch_size])
        s = list(seeds[i:i + batch_size])
        lab = None if labels is None else list(labels[i:i + batch_size])
        cond = backbone.encode(comps, p, max_length, device, labels=lab)
        neg = None
        if guidance > 1.0:
            neg = backbone.encode(comps, [negative_prompt] * len(p), max_length, device,
                                  labels=None if lab is None else [None] * len(p)).to(dtype=dtype)
        x = seeded_noise(s, (c, lat, lat), device, dtype) * sched0.init_noise_sigma
        x = denoise(backbone, model, scheduler_config, x, cond.to(dtype=dtype), neg, steps=steps,
                    guidance=guidance, pixel_size=(resolution, resolution))
        outs.append(decode(comps.vae, x).float().clamp(-1, 1).cpu())
    return torch.cat(outs)


def to_pil(images: torch.Tensor):
    """[-1, 1] float images (B,3,H,W) -> list of PIL RGB images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: torch.Tensor, rows: int, cols: int, pad: int = 2):
    """One PIL image with ``rows`` x ``cols`` tiles (row-major), white padding between tiles."""
    from PIL import Image

    tiles = to_pil(images)
    w, h = tiles[0].size
    canvas = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for k, tile in enumerate(tiles[: rows * cols]):
        r, c = divmod(k, cols)
        canvas.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


__all__ = ["unwrap", "make_scheduler", "training_target", "denoise", "decode", "seeded_noise", "generate", "to_pil",
           "grid"]
