"""Batched generation with the stock PixArtAlphaPipeline, built once.

Why the stock pipeline: it is the reference implementation of PixArt-alpha sampling (CFG in
one batch of 2B, learned-sigma split, micro-conditions of the 1024 px model, VAE decode), and
it accepts precomputed ``prompt_embeds`` and ``latents``, which is all the speed and
determinism we need. What we add around it:

- T5 runs once per distinct prompt (cached on the CPU), never per image; each prompt is
  encoded on its own, so its embedding cannot depend on which other prompts share a batch.
- The initial noise of every sample comes from its own CPU generator seeded from
  (recipe seed, class, index), so an image does not depend on batch size or process count.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .plan import Sample

# Upper bound of the prompt-embedding cache (bytes). PixArt-alpha's T5 output for one prompt
# is 120 x 4096 values (~1 MB in bf16), so thousands of distinct captions fit comfortably.
EMBED_CACHE_BYTES = 4 << 30


class Engine:
    def __init__(self, components, *, resolution: int, steps: int, guidance: float, negative_prompt: str,
                 max_text_tokens: int, device, dtype):
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

        # DPM-Solver++ (2nd order multistep, deterministic: no noise is injected between steps).
        scheduler = DPMSolverMultistepScheduler.from_config(components.scheduler.config, algorithm_type="dpmsolver++")
        self.pipe = PixArtAlphaPipeline(tokenizer=components.tokenizer, text_encoder=components.text_encoder,
                                        vae=components.vae, transformer=components.transformer, scheduler=scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.transformer = components.transformer
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = resolution
        self.steps = steps
        self.guidance = guidance
        self.max_text_tokens = max_text_tokens
        vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        if resolution % vae_scale:
            from ..errors import UserError

            raise UserError(f"model.resolution {resolution} is not a multiple of the VAE's downsampling factor {vae_scale}")
        self.latent_shape = (self.transformer.config.in_channels, resolution // vae_scale, resolution // vae_scale)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_bytes = 0
        self.n_encoded = 0
        self.negative = self._encode(negative_prompt) if guidance > 1.0 else None

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        from ..models.loading import encode_prompts

        embeds, mask = encode_prompts(self.tokenizer, self.text_encoder, [prompt], self.max_text_tokens, self.device)
        self.n_encoded += 1
        return embeds.to("cpu", self.dtype), mask.to("cpu")

    def embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            return hit
        e, m = self._encode(prompt)
        self._cache[prompt] = (e, m)
        self._cache_bytes += e.numel() * e.element_size()
        while self._cache_bytes > EMBED_CACHE_BYTES and len(self._cache) > 1:
            _, (old, _) = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        return e, m

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
        pairs = [self.embed(prompts[s.key]) for s in samples]
        embeds = torch.cat([e for e, _ in pairs]).to(self.device)
        mask = torch.cat([m for _, m in pairs]).to(self.device)
        kwargs = {}
        if self.negative is not None:
            b = len(samples)
            kwargs["negative_prompt_embeds"] = self.negative[0].to(self.device).expand(b, -1, -1)
            kwargs["negative_prompt_attention_mask"] = self.negative[1].to(self.device).expand(b, -1)
        images = self.pipe(
            prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None, latents=self.noise(samples),
            num_inference_steps=self.steps, guidance_scale=self.guidance,
            height=self.resolution, width=self.resolution,
            # Binning would snap a custom resolution to PixArt's aspect-ratio table and resize back.
            use_resolution_binning=False, output_type="np", return_dict=False, **kwargs,
        )[0]
        return images
