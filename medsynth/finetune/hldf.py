"""Hybrid-Level Diffusion Fine-tuning (HLDF): a pixel-space colour loss on images sampled with grad.

Every N optimizer steps the current batch's captions are turned into images by a differentiable
M-step DPM-Solver++ loop (``medsynth.sampling.denoise(grad=True)``, CFG in one batch), decoded by
the frozen VAE with grad, and compared per image and per channel with that batch's real images:

    L_colour = MSE(mean_c(generated), mean_c(real)) + MSE(std_c(generated), std_c(real))

averaged over images and, with ``finetune.hldf.channel_reduction: mean`` (default, as the official
Med-Art code), over the three channels; ``sum`` adds the channels as the paper's Eq. 4 writes it
(3x the mean). Both images in [-1, 1]; the total loss adds ``weight * L_colour`` (weight default
1/M, as in the paper). Only the real images' channel means and standard deviations enter the
loss, so the trainer keeps those (6 numbers per image) rather than the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import sampling


def colour_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and standard deviation (B, C) of (B, C, H, W) images.

    The standard deviation is the population one (divide by H*W): the loss compares two
    distributions of pixel values, not a sample estimate.
    """
    x = images.float().flatten(2)
    return x.mean(-1), x.std(-1, correction=0)


CHANNEL_REDUCTIONS = ("mean", "sum")


def colour_loss(generated: torch.Tensor, real_mean: torch.Tensor, real_std: torch.Tensor,
                channel_reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(squared error of channel means, of channel stds) between generated images and real statistics.

    Always averaged over images; over the channels averaged (``mean``, the official code) or summed
    (``sum``, the paper's Eq. 4).
    """
    if channel_reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduction {channel_reduction!r}: choose one of {CHANNEL_REDUCTIONS}")
    g_mean, g_std = colour_stats(generated)
    lm = F.mse_loss(g_mean, real_mean.to(g_mean), reduction="none")  # (B, C)
    ls = F.mse_loss(g_std, real_std.to(g_std), reduction="none")
    if channel_reduction == "sum":
        return lm.sum(-1).mean(), ls.sum(-1).mean()
    return lm.mean(), ls.mean()


def hldf_weight(hcfg) -> float:
    return (1.0 / hcfg.steps) if hcfg.weight is None else float(hcfg.weight)


@dataclass
class HldfResult:
    loss: torch.Tensor        # weight * (color_mean + color_std), with grad
    color_mean: torch.Tensor  # unweighted parts (after the channel reduction), for logging
    color_std: torch.Tensor
    images: torch.Tensor      # decoded images, detached (for debugging / benches)


def start_latents(hcfg, scheduler_config, shape, generator: torch.Generator, device, dtype,
                  real_latents: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Starting latents and solver start index: pure noise (paper) or noised real latents."""
    noise = torch.randn(shape, generator=generator).to(device=device, dtype=torch.float32)
    sched = sampling.make_scheduler(scheduler_config, hcfg.steps, device)
    if hcfg.start == "noise" or real_latents is None:
        return (noise * sched.init_noise_sigma).to(dtype), 0
    # Skip the first (1 - strength) of the M solver steps and noise the real latents to that level.
    start = min(hcfg.steps - 1, int(round(hcfg.steps * (1.0 - hcfg.start_strength))))
    t0 = sched.timesteps[start:start + 1]
    x = sched.add_noise(real_latents.float(), noise, t0)
    return x.to(dtype), start


def hldf_step(backbone, denoiser, vae, scheduler_config, hcfg, cond, neg_cond, real_mean: torch.Tensor,
              real_std: torch.Tensor, generator: torch.Generator, latent_shape: tuple[int, ...], *,
              real_latents: torch.Tensor | None = None, checkpoint: bool = False,
              pixel_size: tuple[int, int] | None = None) -> HldfResult:
    """One HLDF forward: sample one image per prompt with grad, decode, colour loss vs its real image.

    ``cond`` / ``neg_cond`` are ``backbone.encode`` outputs (``neg_cond`` None: no CFG); the latents
    take the device of the conditioning and the dtype of its first floating tensor (else float32).
    """
    tensors = [v for v in cond.tensors.values() if v is not None]
    device = tensors[0].device
    dtype = next((v.dtype for v in tensors if v.is_floating_point()), torch.float32)
    x, start = start_latents(hcfg, scheduler_config, latent_shape, generator, device, dtype, real_latents)
    x = sampling.denoise(backbone, denoiser, scheduler_config, x, cond, neg_cond,
                         steps=hcfg.steps, guidance=hcfg.guidance, start_index=start, grad=True,
                         grad_last_k=hcfg.grad_last_k, checkpoint=checkpoint, pixel_size=pixel_size)
    images = sampling.decode(vae, x.float())
    lm, ls = colour_loss(images, real_mean, real_std, hcfg.channel_reduction)
    return HldfResult(hldf_weight(hcfg) * (lm + ls), lm.detach(), ls.detach(), images.detach())
