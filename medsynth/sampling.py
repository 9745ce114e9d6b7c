"""DPM-Solver++ sampling for PixArt-alpha with classifier-free guidance in one batch.

One loop serves two callers:

- HLDF (finetune): ``denoise(..., grad=True)`` keeps the autograd graph so the colour loss on
  the decoded images reaches the LoRA weights of the DiT and T5. ``PixArtAlphaPipeline.__call__``
  is decorated with ``torch.no_grad()`` (an outer ``enable_grad`` does not undo it), so the
  pipeline cannot be used for this; the loop here is small and calls the stock, differentiable
  ``DPMSolverMultistepScheduler.step``.
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


def uses_micro_conditions(transformer) -> bool:
    """Whether the DiT takes resolution / aspect-ratio conditions (PixArt-XL-2-1024-MS).

    The flag is the module attribute ``use_additional_conditions``: diffusers derives it in
    ``__init__`` (true when ``sample_size == 128``) and leaves the config value as given, which is
    ``None`` in the hub configs. The config is only read for a module without the attribute.
    """
    model = unwrap(transformer)
    flag = getattr(model, "use_additional_conditions", None)
    if flag is None:
        flag = getattr(getattr(model, "config", None), "use_additional_conditions", None)
    return bool(flag)


def predict_noise(transformer, latents: torch.Tensor, t, embeds: torch.Tensor, mask: torch.Tensor | None,
                  pixel_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The PixArt transformer's prediction (epsilon, or v / x0 as the scheduler's
    ``prediction_type`` says; see ``training_target``), the learned-sigma half of the output dropped.

    PixArt-alpha predicts 2*C channels (epsilon and the variance interpolation); like the
    diffusers pipeline and training scripts we use only the first C channels.
    """
    b = latents.shape[0]
    if not torch.is_tensor(t):
        t = torch.tensor([t], device=latents.device)
    t = t.to(latents.device)
    if t.ndim == 0:
        t = t[None]
    if t.shape[0] != b:
        t = t.expand(b)
    added = {"resolution": None, "aspect_ratio": None}
    if uses_micro_conditions(transformer):
        # The 1024-MS model conditions on image size; pixel size defaults to latent * 8. As in
        # PixArtAlphaPipeline: (height, width) and height / width in the text embeddings' dtype, one
        # row per batch element (the CFG batch of 2B included).
        h, w = pixel_size or (latents.shape[-2] * 8, latents.shape[-1] * 8)
        added = {"resolution": torch.tensor([[h, w]], device=latents.device).to(embeds.dtype).repeat(b, 1),
                 "aspect_ratio": torch.tensor([[float(h / w)]], device=latents.device).to(embeds.dtype).repeat(b, 1)}
    out = transformer(latents, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                      added_cond_kwargs=added, return_dict=False)[0]
    c = latents.shape[1]
    if out.shape[1] == 2 * c:
        out = out[:, :c]
    return out


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the DiT is trained to output for ``add_noise(latents, noise, timesteps)``.

    Follows ``scheduler.config.prediction_type`` (PixArt-alpha: epsilon; the tiny base: v), the
    same setting the diffusers samplers read, so training and sampling cannot disagree.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use epsilon, v_prediction or sample")


def denoise(transformer, scheduler_config, latents: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor | None,
            neg_embeds: torch.Tensor | None, neg_mask: torch.Tensor | None, *, steps: int, guidance: float,
            start_index: int = 0, grad: bool = False, grad_last_k: int | None = None,
            checkpoint: bool = False, pixel_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Run DPM-Solver++ from ``latents`` (already noised to timestep ``start_index``) to t=0.

    CFG uses one batch of 2B (unconditional first, as diffusers does). With ``grad`` the graph is
    kept; ``grad_last_k`` detaches everything before the last K solver steps (bounded memory,
    gradient only through the final steps); ``checkpoint`` recomputes each solver step's DiT
    forward in backward so memory grows by one latent per step rather than one activation set.
    """
    sched = make_scheduler(scheduler_config, steps, latents.device)
    if start_index:
        sched.set_begin_index(start_index)
    timesteps = sched.timesteps[start_index:]
    do_cfg = guidance > 1.0 and neg_embeds is not None
    if do_cfg:
        ctx = torch.cat([neg_embeds, embeds])
        cmask = torch.cat([neg_mask, mask]) if mask is not None else None
    else:
        ctx, cmask = embeds, mask
    n = len(timesteps)
    first_grad = max(0, n - grad_last_k) if (grad and grad_last_k) else 0

    def one(x, t, ctx_, cmask_):
        inp = torch.cat([x, x]) if do_cfg else x
        inp = sched.scale_model_input(inp, t)
        eps = predict_noise(transformer, inp, t, ctx_, cmask_, pixel_size)
        if do_cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        return eps

    for i, t in enumerate(timesteps):
        track = grad and i >= first_grad
        with torch.set_grad_enabled(track):
            if track and i == first_grad and first_grad > 0:
                latents = latents.detach()
            if track and checkpoint:
                eps = torch.utils.checkpoint.checkpoint(one, latents, t, ctx, cmask, use_reentrant=False)
            else:
                eps = one(latents, t, ctx, cmask)
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


def encode_text(tokenizer, text_encoder, prompts: Sequence[str], max_length: int, device):
    """T5 embeddings + attention mask exactly as synthesis makes them (lower-cased, padded to
    ``max_length``): training and generation must see the same text preprocessing.

    Not wrapped in no_grad on purpose: finetune calls it with grad when T5 carries LoRA.
    """
    from .models.loading import encode_prompts

    return encode_prompts(tokenizer, text_encoder, list(prompts), max_length, device)


@torch.no_grad()
def generate(transformer, text_encoder, tokenizer, vae, scheduler_config, prompts: Sequence[str],
             seeds: Sequence[int], *, resolution: int, steps: int = 20, guidance: float = 4.5,
             max_length: int = 120, negative_prompt: str = "", batch_size: int = 8,
             device=None, dtype=None) -> torch.Tensor:
    """Images for ``prompts`` (one per prompt, noise from ``seeds``), float32 in [-1, 1], on CPU."""
    tr = unwrap(transformer)
    device = device or next(tr.parameters()).device
    dtype = dtype or next(tr.parameters()).dtype
    c = tr.config.in_channels
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = resolution // vae_scale
    sched0 = make_scheduler(scheduler_config, steps, device)
    outs = []
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i:i + batch_size])
        s = list(seeds[i:i + batch_size])
        embeds, mask = encode_text(tokenizer, text_encoder, p, max_length, device)
        neg, neg_mask = None, None
        if guidance > 1.0:
            neg, neg_mask = encode_text(tokenizer, text_encoder, [negative_prompt] * len(p), max_length, device)
            neg = neg.to(dtype)
        x = seeded_noise(s, (c, lat, lat), device, dtype) * sched0.init_noise_sigma
        x = denoise(transformer, scheduler_config, x, embeds.to(dtype), mask, neg, neg_mask, steps=steps,
                    guidance=guidance, pixel_size=(resolution, resolution))
        outs.append(decode(vae, x).float().clamp(-1, 1).cpu())
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


__all__ = ["unwrap", "make_scheduler", "uses_micro_conditions", "predict_noise", "denoise", "decode", "seeded_noise", "encode_text",
           "generate", "to_pil", "grid"]
