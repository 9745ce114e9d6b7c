"""Stable Diffusion XL behind the backbone interface: UNet2DConditionModel (``addition_embed_type``
``text_time``) + CLIPTextModel (``text_encoder``) + CLIPTextModelWithProjection (``text_encoder_2``)
+ two CLIP tokenizers + VAE + scheduler, with ``StableDiffusionXLPipeline`` as the stock pipeline.

Hub id: ``stabilityai/stable-diffusion-xl-base-1.0`` (the paper trains it at 512 px: ``model.resolution: 512``).

Conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` makes it with ``clip_skip=None``:
``embeds`` = the penultimate hidden states of both encoders (each tokenizer padded to its
``model_max_length``, 77), concatenated on the feature axis; ``pooled`` = text_encoder_2's projected
pooled output (the UNet's ``text_embeds``). An empty prompt is all zeros when the base's
model_index.json sets ``force_zeros_for_empty_prompt`` (SDXL base does; the pipeline's default):
that is the pipeline's negative for ``pipe(prompt)``, and SDXL was trained with zeroed embeddings
for dropped captions. The micro-conditioning ``time_ids`` (original size, crop top-left (0, 0),
target size) come from the pixel size :meth:`predict` is given (the training / sampling
resolution), as the pipeline builds them from ``height``/``width``; a Cond may carry its own.

LoRA presets: as :mod:`medsynth.models.sd` (UNet ``to_q to_k to_v to_out.0``; both CLIPs
``q_proj k_proj v_proj out_proj`` [+ ``fc1 fc2`` for ``full``]). Output: the PEFT folders plus
``pytorch_lora_weights.safetensors`` from ``StableDiffusionXLPipeline.save_lora_weights`` (UNet and
both text encoders, with the adapter metadata), so ``pipe.load_lora_weights(final_dir)`` works.

fp16: SDXL's VAE overflows in fp16; its config sets ``force_upcast`` and the stock pipeline then
decodes in fp32. medsynth's own decode path (``sampling.decode``: HLDF, sample grids) runs on the
VAE the finetune loop has already moved to fp32, so both decode in fp32.

Tiny base (``model.base: tiny`` with ``model.family: sdxl``): a small text_time UNet whose
cross-attention width is the sum of both encoders' widths, a CLIP pair (text_encoder_2 twice as
wide, with a projection) over offline-trained BPE tokenizers (:func:`sd.build_clip_tokenizer`;
tokenizer_2 pads with ``!`` as SDXL's does), the autoencoder of ``model.tiny.autoencoder`` and
SDXL's EulerDiscrete scheduler config; saved with ``StableDiffusionXLPipeline.save_pretrained``
under ``tiny-base/sdxl-<key>/``.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..workspace import atomic_write_json, sha256_json
from .backbone import Cond
from .sd import (CLIP_MAX_TOKENS, CLIP_TARGETS, LORA_FILE, UNET_TARGETS, SDBackbone, _tiny_vae, build_clip_tokenizer,
                 unet_geometry)

# scheduler/scheduler_config.json of stable-diffusion-xl-base-1.0: EulerDiscrete, scaled-linear
# betas, "leading" spacing. The keys Euler does not take stay in the saved config (DDPM / DDIM built
# from it read clip_sample, whose default is true).
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
_NOT_EULER = ("clip_sample", "sample_max_value", "set_alpha_to_one", "skip_prk_steps")

TINY_SDXL_FORMAT = 2  # 2: the tiny CLIP tokenizer is learned deterministically (sd.learn_bpe_merges)


# ----------------------------------------------------------------------------- tiny base


def text_configs(recipe, tokenizer) -> tuple[dict, dict]:
    """CLIP-L-like (quick_gelu) and bigG-like (gelu, twice as wide, projected to text_dim) encoders.

    ``text_layers + 1`` layers each: SDXL conditions on the penultimate hidden states, so the last
    layer of ``text_encoder`` feeds nothing (as in SDXL itself) and ``text_layers`` layers do."""
    tiny = recipe.model.tiny
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=tiny.text_layers + 1, num_attention_heads=tiny.heads,
                  max_position_embeddings=CLIP_MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    one = dict(common, hidden_size=tiny.text_dim, intermediate_size=4 * tiny.text_dim, hidden_act="quick_gelu")
    two = dict(common, hidden_size=2 * tiny.text_dim, intermediate_size=8 * tiny.text_dim, hidden_act="gelu",
               projection_dim=tiny.text_dim)
    return one, two


def unet_config(recipe, latent_channels: int, latent_size: int, te1: dict, te2: dict) -> dict:
    """SDXL's UNet layout (plain first level, cross-attention below; linear projections; text_time
    added conditioning), two levels, narrow."""
    tiny = recipe.model.tiny
    width = tiny.heads * tiny.head_dim
    time_dim = 2 * tiny.head_dim  # SDXL: 256 per size / crop number
    return dict(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(width, 2 * width), layers_per_block=1, norm_num_groups=min(8, width),
        attention_head_dim=tiny.head_dim, use_linear_projection=True,
        cross_attention_dim=te1["hidden_size"] + te2["hidden_size"],
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + te2["projection_dim"],
    )


def scheduler_config(recipe) -> dict:
    return {**SDXL_SCHEDULER, "prediction_type": recipe.model.tiny.prediction_type}


def _euler(config: dict):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**{k: v for k, v in config.items() if k not in _NOT_EULER})
    sched.register_to_config(**{k: config[k] for k in _NOT_EULER})
    return sched


def tiny_dir(recipe) -> Path:
    from .tiny import base_inputs

    key = sha256_json({"family": "sdxl", "format": TINY_SDXL_FORMAT, **base_inputs(recipe)})[:16]
    return recipe.workdir_path / "tiny-base" / f"sdxl-{key}"


def ensure_tiny(recipe) -> Path:
    """The cached tiny SDXL base for this recipe and workspace, built on first use."""
    from .. import console
    from ..data import read_manifest
    from . import tiny as T

    final = tiny_dir(recipe)
    if (final / T.INFO_FILE).is_file():
        return final
    f, res = unet_geometry(recipe, "SDXL")
    console.info(f"tiny base: building {final} (Stable Diffusion XL layout, once per data set and settings)")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with T._building(final) as tmp:
        tokenizer = build_clip_tokenizer(recipe)
        tokenizer_2 = copy.deepcopy(tokenizer)
        tokenizer_2.pad_token = "!"  # SDXL's tokenizer_2 (OpenCLIP's) pads with "!", not <|endoftext|>
        rows = read_manifest(recipe.workdir_path, "train")
        images = T.load_images([r.path for r in rows], res)
        vae, vae_stats = _tiny_vae(recipe, images)
        te1, te2 = text_configs(recipe, tokenizer)
        torch.manual_seed(recipe.seed)
        unet = UNet2DConditionModel(**unet_config(recipe, T.latent_channels(recipe.model.tiny), res // f, te1, te2))
        torch.manual_seed(recipe.seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te1)).eval()
        torch.manual_seed(recipe.seed + 4)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2)).eval()
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=_euler(scheduler_config(recipe)), force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        atomic_write_json(tmp / T.INFO_FILE, {
            "family": "sdxl", "format": TINY_SDXL_FORMAT, "tokenizer_vocab": len(tokenizer), "vae": vae_stats,
            "parameters": {"unet": count(unet), "text_encoder": count(text_encoder),
                           "text_encoder_2": count(text_encoder_2), "vae": count(vae)},
        })
    return final


# ----------------------------------------------------------------------------- the backbone


@functools.lru_cache(maxsize=16)
def force_zeros_for_empty_prompt(base: str) -> bool:
    """The base's model_index.json ``force_zeros_for_empty_prompt`` (the pipeline's default, true,
    when the file or the key is missing)."""
    from .loading import _is_local, is_offline

    try:
        if _is_local(base):
            path = Path(base) / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base, "model_index.json", local_files_only=is_offline()))
        value = json.loads(path.read_text(encoding="utf-8")).get("force_zeros_for_empty_prompt", True)
    except Exception:  # check_base reports an unreadable base; here the pipeline's default applies
        return True
    return bool(value)


class SDXLBackbone(SDBackbone):
    name = "sdxl"
    label = "Stable Diffusion XL"
    hub_example = "stabilityai/stable-diffusion-xl-base-1.0"
    parts = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
    denoiser_part = "unet"
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    layout = "model_index.json, unet/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/, scheduler/"
    lora_presets = {"denoiser": UNET_TARGETS, "text_encoder": CLIP_TARGETS, "text_encoder_2": CLIP_TARGETS}
    part_classes = {**SDBackbone.part_classes, "text_encoder_2": "transformers.CLIPTextModelWithProjection"}
    scheduler_class = "EulerDiscreteScheduler"  # what SDXL base ships

    def build_tiny(self, recipe) -> Path:
        return ensure_tiny(recipe)

    def tiny_dir(self, recipe) -> Path:
        return tiny_dir(recipe)

    def encode(self, comps, prompts: Sequence[str], max_length: int, device, labels=None) -> Cond:
        # Not under no_grad: both CLIP LoRAs train through this.
        states, pooled = [], None
        for tok, te in ((comps.tokenizer, comps.text_encoder), (comps.tokenizer_2, comps.text_encoder_2)):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = te(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # the pooled, projected output of text_encoder_2
                pooled = out[0]
            states.append(out.hidden_states[-2])
        embeds = torch.cat(states, dim=-1)
        empty = [i for i, p in enumerate(prompts) if p == ""]
        if empty and force_zeros_for_empty_prompt(str(comps.base)):
            keep = torch.ones(len(prompts), 1, device=embeds.device, dtype=embeds.dtype)
            keep[empty] = 0
            embeds, pooled = embeds * keep[:, :, None], pooled * keep
        return Cond({"embeds": embeds, "pooled": pooled})

    @staticmethod
    def time_ids(pixel_size: tuple[int, int], batch: int, device, dtype) -> torch.Tensor:
        """(original size, crop top-left (0, 0), target size) as the pipeline's _get_add_time_ids."""
        h, w = pixel_size
        return torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).expand(batch, 6)

    def predict(self, denoiser, latents, t, cond: Cond, pixel_size=None):
        if torch.is_tensor(t):
            t = t.to(latents.device)
        embeds = cond["embeds"]
        ids = cond["time_ids"]
        if ids is None:
            # No pixel size: SDXL's own x8 VAE (the interface passes it wherever it is known).
            size = pixel_size or (latents.shape[-2] * 8, latents.shape[-1] * 8)
            ids = self.time_ids(size, latents.shape[0], latents.device, embeds.dtype)
        added = {"text_embeds": cond["pooled"], "time_ids": ids}
        return denoiser(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def stock_pipeline(self, comps, scheduler=None):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
            scheduler=scheduler or comps.scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt(str(comps.base)), add_watermarker=False)

    def pipeline_generate(self, pipe, cond: Cond, neg: Cond | None, latents, *, steps, guidance, resolution):
        kw = {}
        if neg is not None:
            kw = dict(negative_prompt_embeds=neg["embeds"], negative_pooled_prompt_embeds=neg["pooled"])
        return pipe(prompt_embeds=cond["embeds"], pooled_prompt_embeds=cond["pooled"], latents=latents,
                    num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                    output_type="np", return_dict=False, **kw)[0]

    def write_lora_file(self, out: Path, denoiser, text_encoders: dict, denoiser_cfg, te_cfgs: dict) -> None:
        """``pytorch_lora_weights.safetensors`` for ``StableDiffusionXLPipeline.load_lora_weights``, as
        diffusers' SDXL LoRA scripts write it, with the LoraConfigs as adapter metadata (alpha / r)."""
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        kw = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser)),
              "unet_lora_adapter_metadata": denoiser_cfg.to_dict()}
        for part in self.text_encoder_parts:
            te = text_encoders.get(part)
            if te is not None:
                kw[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
                kw[f"{part}_lora_adapter_metadata"] = te_cfgs[part].to_dict()
        StableDiffusionXLPipeline.save_lora_weights(str(out), weight_name=LORA_FILE, safe_serialization=True, **kw)


BACKBONE = SDXLBackbone()

__all__ = ["BACKBONE", "SDXLBackbone", "SDXL_SCHEDULER", "ensure_tiny", "force_zeros_for_empty_prompt"]
