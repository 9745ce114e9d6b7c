"""TAEF2, the pretrained tiny autoencoder for the FLUX.2 latent space, as a diffusers model.

The weights (MIT, Copyright (c) 2023 Ollin Boer Bohan; github.com/madebyollin/taesd, files
``taef2_encoder.pth`` / ``taef2_decoder.pth``) ship with medsynth in ``weights/taef2.safetensors``
(see ``weights/README.md`` and ``bench/convert_taef2.py``). The network below is written for
medsynth from the published description of the architecture; it is not a copy of upstream code.

Why a class of our own and not diffusers' ``AutoencoderTiny``: TAEF2's lowest-resolution blocks
carry an extra 1x1 "pool" branch (1x1 conv 64->256, GroupNorm, ReLU, 1x1 conv 256->64, added to
the block input) that ``AutoencoderTiny`` does not have, so its state dict does not load there.

What medsynth's pipelines need from a VAE, and how this class gives it:

- ``encode(x).latent_dist`` with ``mode() / sample(generator=) / mean / parameters``: TAEF2's
  encoder is deterministic, so the distribution is diffusers' ``DiagonalGaussianDistribution``
  over ``mean || logvar`` with ``logvar = -30`` everywhere (the lowest value that class allows;
  ``finetune/loop.py`` caches ``parameters`` and later draws ``mean + exp(logvar / 2) * noise``,
  which is then ``mean`` to within 3e-7). A true zero variance would be ``logvar = -inf``,
  which turns into NaN in ``kl()`` / ``nll()`` and in that cache.
- ``decode(z)`` returns ``.sample`` (or a tuple with ``return_dict=False``); images are in
  [-1, 1] at the interface, as for ``AutoencoderKL``; TAEF2 itself works in [0, 1].
- ``config.scaling_factor`` / ``config.shift_factor`` as ``AutoencoderKL``;
  ``config.block_out_channels`` has 4 entries so ``2 ** (len - 1) == 8`` is the downsampling.
- ``config.latent_shift``: an optional per-channel offset removed from the raw latents in
  ``encode`` and added back in ``decode``, measured on the training images by the tiny base
  (``tiny._centre_and_scale_taef2``). It lives inside the model rather than in ``shift_factor``
  because ``PixArtAlphaPipeline`` decodes ``latents / scaling_factor`` and ignores
  ``shift_factor``; TAEF2's decoder starts with a soft clamp, so the offset cannot be folded
  into a convolution bias as is done for the fitted VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

# The shipped weights (fp16, encoder.* and decoder.* tensors) and what they were made from.
WEIGHTS = Path(__file__).resolve().parent / "weights" / "taef2.safetensors"
# The lowest value DiagonalGaussianDistribution clamps logvar to: "no variance" without -inf.
DETERMINISTIC_LOGVAR = -30.0


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


def _conv(cin: int, cout: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class _Block(nn.Module):
    """Residual unit: ReLU(x + conv-ReLU-conv-ReLU-conv(x)); with ``pool``, x first gets a 1x1 bottleneck added."""

    def __init__(self, ch: int, pool: bool):
        super().__init__()
        # Attribute names and Sequential positions fix the state-dict keys (conv.0/2/4, pool.0/1/3).
        self.conv = nn.Sequential(_conv(ch, ch), nn.ReLU(), _conv(ch, ch), nn.ReLU(), _conv(ch, ch))
        self.pool = nn.Sequential(
            nn.Conv2d(ch, 4 * ch, 1, bias=False), nn.GroupNorm(4, 4 * ch), nn.ReLU(), nn.Conv2d(4 * ch, ch, 1, bias=False),
        ) if pool else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.act(self.conv(x) + x)


class _SoftClamp(nn.Module):
    """tanh(x / c) * c: keeps out-of-range latents (e.g. from an untrained DiT) from blowing up the decoder."""

    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.limit) * self.limit


class _Stack(nn.Sequential):
    """nn.Sequential that recomputes each block's activations in backward when checkpointing is on."""

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self:
            x = self._gradient_checkpointing_func(layer, x) if ckpt and isinstance(layer, _Block) else layer(x)
        return x


def _encoder(cin: int, ch: int, latent: int) -> _Stack:
    layers: list[nn.Module] = [_conv(cin, ch), _Block(ch, False)]
    for level in range(3):
        low = level == 2  # the 1/8-resolution blocks carry the pool branch
        layers += [_conv(ch, ch, stride=2, bias=False), _Block(ch, low), _Block(ch, low), _Block(ch, low)]
    layers.append(_conv(ch, latent))
    return _Stack(*layers)


def _decoder(latent: int, ch: int, cout: int, clamp: float) -> _Stack:
    layers: list[nn.Module] = [_SoftClamp(clamp), _conv(latent, ch), nn.ReLU()]
    for level in range(3):
        low = level == 0
        layers += [_Block(ch, low), _Block(ch, low), _Block(ch, low),
                   nn.Upsample(scale_factor=2, mode="nearest"), _conv(ch, ch, bias=False)]
    layers += [_Block(ch, False), _conv(ch, cout)]
    return _Stack(*layers)


class AutoencoderTAEF2(ModelMixin, ConfigMixin):
    """TAEF2 (32 latent channels at 1/8 resolution) with ``AutoencoderKL``'s calling conventions."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 32,
                 channels: int = 64, latent_clamp: float = 3.0,
                 block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
                 scaling_factor: float = 1.0, shift_factor: float | None = None,
                 latent_shift: list[float] | None = None, sample_size: int = 64):
        super().__init__()
        if len(block_out_channels) != 4:
            raise ValueError(f"block_out_channels must have 4 entries (TAEF2 downsamples x8), got {block_out_channels}")
        if latent_shift is not None and len(latent_shift) != latent_channels:
            raise ValueError(f"latent_shift needs {latent_channels} values, got {len(latent_shift)}")
        self.encoder = _encoder(in_channels, channels, latent_channels)
        self.decoder = _decoder(latent_channels, channels, out_channels, latent_clamp)

    @classmethod
    def from_shipped(cls, path: Path | str = WEIGHTS, **config) -> "AutoencoderTAEF2":
        """The pretrained TAEF2 in float32 from the weights shipped with medsynth (strict load)."""
        from safetensors.torch import load_file

        model = cls(**config)
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        model.load_state_dict(state, strict=True)
        return model.eval()

    def _shift(self, z: torch.Tensor) -> torch.Tensor | None:
        s = self.config.latent_shift
        return None if s is None else torch.tensor(s, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] -> a (deterministic) latent distribution, centred by ``latent_shift``."""
        z = self.encoder(x * 0.5 + 0.5)
        shift = self._shift(z)
        if shift is not None:
            z = z - shift
        params = torch.cat([z, torch.full_like(z, DETERMINISTIC_LOGVAR)], dim=1)
        dist = DiagonalGaussianDistribution(params, deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents (as ``encode`` gives them) -> images in [-1, 1] (not clamped, so gradients survive)."""
        shift = self._shift(z)
        if shift is not None:
            z = z + shift
        x = self.decoder(z) * 2.0 - 1.0
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        z = self.encode(sample).latent_dist.mode()
        return self.decode(z, return_dict=return_dict)
