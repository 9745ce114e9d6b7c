"""Batched generation with the backbone's stock diffusers pipeline, built once.

Why the stock pipeline: it is the reference implementation of its family's sampling (CFG in one
batch of 2B, the family's own output handling and micro-conditions, VAE decode), and the
pipelines accept precomputed conditioning and ``latents``, which is all the speed and determinism
we need. The backbone (``medsynth.models.backbone``) builds the pipeline and calls it. What we
add around it:

- The text encoder runs once per distinct prompt (cached on the CPU), never per image; each
  prompt is encoded on its own, so its conditioning cannot depend on which other prompts share a
  batch.
- The initial noise of every sample comes from its own CPU generator seeded from
  (recipe seed, class, index), so an image does not depend on batch size or process count.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .plan import Sample

# Upper bound of the prompt-conditioning cache (bytes). A 120 x 4096 T5 output for one prompt
# is ~1 MB in bf16, so thousands of distinct captions fit comfortably.
EMBED_CACHE_BYTES = 4 << 30


class Engine:
    def __init__(self, components, backbone=None, *, resolution: int, steps: int, guidance: float,
                 negative_prompt: str, max_text_tokens: int, device, dtype):
        """``backbone`` defaults to the family ``components`` were loaded as (``load_components``)."""
        if backbone is None:
            from ..models.backbone import DEFAULT_FAMILY, get

            backbone = get(getattr(components, "family", None) or DEFAULT_FAMILY)
        self.backbone = backbone
        self.pipe = backbone.stock_pipeline(components, backbone.sampling_scheduler(components.scheduler.config))
        self.pipe.set_progress_bar_config(disable=True)
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = resolution
        self.steps = steps
        self.guidance = guidance
        self.max_text_tokens = max_text_tokens
        vae_scale = backbone.vae_scale(components.vae)
        if resolution % vae_scale:
            from ..errors import UserError

            raise UserError(f"model.resolution {resolution} is not a multiple of the VAE's downsampling factor {vae_scale}")
        lat = resolution // vae_scale
        self.latent_shape = (backbone.latent_channels(components), lat, lat)
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self.n_encoded = 0
        self.negative = self._encode(negative_prompt) if guidance > 1.0 else None

    @torch.no_grad()
    def _encode(self, prompt: str, label: int | None = None):
        # A class-conditional backbone gets the sample's class (None: the null label, the negative).
        labels = [label] if getattr(self.backbone, "class_conditional", False) else None
        cond = self.backbone.encode(self.components, [prompt], self.max_text_tokens, self.device, labels=labels)
        self.n_encoded += 1
        return cond.to(device="cpu", dtype=self.dtype)

    def embed(self, prompt: str, label: int | None = None):
        """The conditioning (a backbone ``Cond``, one row, on the CPU) of ``prompt`` (and ``label`` for a
        class-conditional backbone), cached."""
        key = (prompt, label) if getattr(self.backbone, "class_conditional", False) else prompt
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        c = self._encode(prompt, label)
        self._cache[key] = c
        self._cache_bytes += c.nbytes()
        while self._cache_bytes > EMBED_CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes()
        return c

    def noise(self, samples: list[Sample]) -> torch.Tensor:
        # Drawn on the CPU in float32, then moved: the same seed gives the same noise on any device.
        out = [torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(s.seed)) for s in samples]
        return torch.stack(out).to(self.device, self.dtype)

    def generate(self, samples: list[Sample], prompts: dict[str, str]) -> list[np.ndarray]:
        """uint8 HxWx3 images for ``samples`` (one pipeline call for the whole batch)."""
        images = self.generate_float(samples, prompts)
        # Same rounding as diffusers' numpy_to_pil.
        return list((images * 255).round().clip(0, 255).astype(np.uint8))

    @torch.no_grad()
    def generate_float(self, samples: list[Sample], prompts: dict[str, str]) -> np.ndarray:
        """The pipeline's float images in [0, 1], shape (B, H, W, 3), before rounding to 8 bits."""
        from ..models.backbone import Cond

        cond = Cond.cat([self.embed(prompts[s.key], s.cls) for s in samples]).to(device=self.device)
        neg = None
        if self.negative is not None:
            neg = self.negative.to(device=self.device).expand(len(samples))
        return self.backbone.pipeline_generate(self.pipe, cond, neg, self.noise(samples), steps=self.steps,
                                               guidance=self.guidance, resolution=self.resolution)
