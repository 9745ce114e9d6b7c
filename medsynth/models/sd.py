"""Stable Diffusion 1.4 / 1.5 behind the backbone interface: UNet2DConditionModel + CLIPTextModel
(77 tokens) + VAE + scheduler, with ``StableDiffusionPipeline`` as the stock pipeline.

Hub ids: ``CompVis/stable-diffusion-v1-4``, ``stable-diffusion-v1-5/stable-diffusion-v1-5``.

Conditioning: the CLIP text encoder's last hidden state, exactly as
``StableDiffusionPipeline.encode_prompt`` makes it with ``clip_skip=None``: padded to the
tokenizer's ``model_max_length`` (77), truncated, no attention mask unless the text encoder's
config asks for one. ``model.max_text_tokens`` does not change it: the UNet was trained on 77.

LoRA presets (peft matches a target against the end of a module name):

- UNet ``paper`` = ``to_q to_k to_v to_out.0``, the targets of diffusers' LoRA training scripts
  (train_text_to_image_lora.py, train_dreambooth_lora.py): every self- and cross-attention
  projection. ``attn_ff`` adds the transformer blocks' feed-forward ``ff.net.0.proj ff.net.2``.
- CLIP ``paper_parity`` = ``q_proj k_proj v_proj out_proj`` (the same scripts' text-encoder
  targets); ``full`` adds the MLP ``fc1 fc2``.

Output of a fine-tune: the PEFT folders (``unet/``, ``text_encoder/``) that every family writes,
plus ``pytorch_lora_weights.safetensors`` written with ``StableDiffusionPipeline.save_lora_weights``
from the peft state dicts converted by diffusers' own helpers, so a stock pipeline takes it with
``pipe.load_lora_weights(final_dir)``.

Tiny base (``model.base: tiny`` with ``model.family: sd``): a small UNet2DConditionModel and
CLIPTextModel from configs, a CLIP byte-level BPE tokenizer trained offline on the tiny corpus and
the recipe's texts, the autoencoder of ``model.tiny.autoencoder`` (TAEF2 or the fitted KL VAE,
both from :mod:`medsynth.models.tiny`) and SD's scheduler config; saved with
``StableDiffusionPipeline.save_pretrained`` and loaded back through :meth:`SDBackbone.load_part`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..workspace import atomic_write_json, sha256_json
from .backbone import Backbone, Cond

UNET_TARGETS: dict[str, list[str]] = {
    "paper": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}

CLIP_TARGETS: dict[str, list[str]] = {
    "full": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "paper_parity": ["q_proj", "k_proj", "v_proj", "out_proj"],
}

# scheduler/scheduler_config.json of stable-diffusion-v1-5 (v1-4 is the same): PNDM, scaled-linear
# betas. The tiny base keeps it and takes prediction_type from model.tiny (see tiny.scheduler_config).
SD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "prediction_type": "epsilon",
}

TINY_SD_FORMAT = 2  # 2: the tiny CLIP tokenizer is learned deterministically (learn_bpe_merges)
CLIP_MAX_TOKENS = 77  # CLIP's position embeddings: every SD 1.x text encoder has 77
LORA_FILE = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------- tiny base


def build_clip_tokenizer(recipe):
    """A ``CLIPTokenizer`` whose byte-level BPE merges are learned offline (:func:`learn_bpe_merges`)
    from tiny.CORPUS plus the recipe's class texts, split into words by CLIP's own normaliser and
    pre-tokeniser (tokenizers'), so the slow CLIPTokenizer applies the merges to the same words."""
    from collections import Counter

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    from .tiny import learn_bpe_merges, tokenizer_corpus, tokenizer_inputs

    inp = tokenizer_inputs(recipe)
    lines = tokenizer_corpus(recipe)

    backend = CLIPTokenizer().backend_tokenizer  # an empty vocabulary: only CLIP's normaliser and pre-tokeniser
    words = Counter(w for ln in lines
                    for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(ln)))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # As CLIP's own vocab: every byte symbol alone and as a word end, then the merges' results, then
    # the two special tokens last (so no learned piece can shadow them).
    vocab: dict[str, int] = {}
    for piece in sorted(alphabet) + sorted(a + "</w>" for a in alphabet):
        vocab.setdefault(piece, len(vocab))
    merges = learn_bpe_merges(words, max(0, inp["vocab_size"] - len(alphabet)), end_of_word="</w>")
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TOKENS)


def unet_config(recipe, latent_channels: int, latent_size: int) -> dict:
    """SD 1.x's UNet layout (cross-attention down/up blocks, then plain ones), two levels, narrow."""
    tiny = recipe.model.tiny
    width = tiny.heads * tiny.head_dim
    return dict(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(width, 2 * width), layers_per_block=1, norm_num_groups=min(8, width),
        cross_attention_dim=tiny.text_dim, attention_head_dim=tiny.head_dim,
    )


def text_config(recipe, tokenizer) -> dict:
    tiny = recipe.model.tiny
    return dict(
        vocab_size=len(tokenizer), hidden_size=tiny.text_dim, intermediate_size=4 * tiny.text_dim,
        num_hidden_layers=tiny.text_layers, num_attention_heads=tiny.heads,
        max_position_embeddings=CLIP_MAX_TOKENS, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def scheduler_config(recipe) -> dict:
    return {**SD_SCHEDULER, "prediction_type": recipe.model.tiny.prediction_type}


def _pndm(config: dict):
    """A PNDMScheduler whose saved config holds every key of SD's file, ``clip_sample`` included:
    PNDM does not take that key, but DDIM / DDPM built ``from_config`` read it (their default is true)."""
    from diffusers import PNDMScheduler

    sched = PNDMScheduler(**{k: v for k, v in config.items() if k != "clip_sample"})
    sched.register_to_config(clip_sample=config["clip_sample"])
    return sched


def tiny_dir(recipe) -> Path:
    from .tiny import base_inputs

    key = sha256_json({"family": "sd", "format": TINY_SD_FORMAT, **base_inputs(recipe)})[:16]
    return recipe.workdir_path / "tiny-base" / f"sd-{key}"


def _tiny_vae(recipe, images):
    """The tiny autoencoder ``model.tiny.autoencoder`` names, as tiny.build_tiny_base makes it."""
    from . import tiny as T

    t = recipe.model.tiny
    if t.autoencoder == "taef2":
        from .taef2 import AutoencoderTAEF2

        vae = AutoencoderTAEF2.from_shipped(sample_size=recipe.model.resolution)
        return vae, {"autoencoder": "taef2", **T._centre_and_scale_taef2(vae, images)}
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed + 2)
    vae = AutoencoderKL(**T.vae_config(recipe))
    crop = t.vae_fit_crop if t.vae_fit_crop else recipe.model.resolution
    stats = T.fit_vae(vae, images, steps=t.vae_fit_steps, batch=t.vae_fit_batch,
                      crop=min(crop, recipe.model.resolution), seed=recipe.seed + 3)
    return vae, {"autoencoder": "fitted", **stats}


def unet_geometry(recipe, label: str) -> tuple[int, int]:
    """(autoencoder factor, resolution) of a tiny UNet base (SD, SDXL), or a UserError when the
    resolution does not pass through the autoencoder and the UNet's one downsampling."""
    from ..errors import UserError
    from . import tiny as T

    f, res = T.vae_factor(recipe.model.tiny), recipe.model.resolution
    if res % (2 * f):
        raise UserError(f"model.resolution {res} does not suit the tiny {label} base: its autoencoder downsamples x{f} "
                        f"and its UNet x2, so it must be a multiple of {2 * f}; e.g. --set "
                        f"model.resolution={max(2 * f, res // (2 * f) * 2 * f)}")
    return f, res


def ensure_tiny(recipe) -> Path:
    """The cached tiny SD base for this recipe and workspace, built on first use."""
    from .. import console
    from ..data import read_manifest
    from . import tiny as T

    final = tiny_dir(recipe)
    if (final / T.INFO_FILE).is_file():
        return final
    f, res = unet_geometry(recipe, "SD")
    console.info(f"tiny base: building {final} (Stable Diffusion layout, once per data set and settings)")
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with T._building(final) as tmp:
        tokenizer = build_clip_tokenizer(recipe)
        rows = read_manifest(recipe.workdir_path, "train")
        images = T.load_images([r.path for r in rows], res)
        vae, vae_stats = _tiny_vae(recipe, images)
        torch.manual_seed(recipe.seed)
        unet = UNet2DConditionModel(**unet_config(recipe, T.latent_channels(recipe.model.tiny), res // f))
        torch.manual_seed(recipe.seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(recipe, tokenizer))).eval()
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=_pndm(scheduler_config(recipe)), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        atomic_write_json(tmp / T.INFO_FILE, {
            "family": "sd", "format": TINY_SD_FORMAT, "tokenizer_vocab": len(tokenizer), "vae": vae_stats,
            "parameters": {"unet": count(unet), "text_encoder": count(text_encoder), "vae": count(vae)},
        })
    return final


# ----------------------------------------------------------------------------- the backbone


class SDBackbone(Backbone):
    name = "sd"
    label = "Stable Diffusion 1.x"
    hub_example = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    parts = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
    denoiser_part = "unet"
    text_encoder_parts = ("text_encoder",)
    layout = "model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/"
    lora_presets = {"denoiser": UNET_TARGETS, "text_encoder": CLIP_TARGETS}
    part_classes = {"unet": "diffusers.UNet2DConditionModel", "text_encoder": "transformers.CLIPTextModel"}
    scheduler_class = "PNDMScheduler"  # what SD ships

    def build_tiny(self, recipe) -> Path:
        return ensure_tiny(recipe)

    def tiny_dir(self, recipe) -> Path:
        return tiny_dir(recipe)

    def encode(self, comps, prompts: Sequence[str], max_length: int, device, labels=None) -> Cond:
        # Not under no_grad: the CLIP LoRA trains through this.
        from ..sampling import unwrap

        tok, te = comps.tokenizer, comps.text_encoder
        enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = None
        if getattr(unwrap(te).config, "use_attention_mask", False):
            mask = enc.attention_mask.to(device)
        return Cond({"embeds": te(enc.input_ids.to(device), attention_mask=mask)[0]})

    def predict(self, denoiser, latents, t, cond: Cond, pixel_size=None):
        if torch.is_tensor(t):
            t = t.to(latents.device)
        return denoiser(latents, t, encoder_hidden_states=cond["embeds"], return_dict=False)[0]

    def stock_pipeline(self, comps, scheduler=None):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=comps.unet, scheduler=scheduler or comps.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def pipeline_generate(self, pipe, cond: Cond, neg: Cond | None, latents, *, steps, guidance, resolution):
        return pipe(prompt_embeds=cond["embeds"], negative_prompt_embeds=None if neg is None else neg["embeds"],
                    latents=latents, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                    width=resolution, output_type="np", return_dict=False)[0]

    def write_lora_file(self, out: Path, denoiser, text_encoders: dict, denoiser_cfg, te_cfgs: dict) -> None:
        """``pytorch_lora_weights.safetensors`` for ``StableDiffusionPipeline.load_lora_weights``, made
        as diffusers' LoRA training scripts make it; the LoraConfigs go in as adapter metadata, so the
        loader restores alpha (scale = alpha / r) instead of assuming alpha = r."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        kw = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser)),
              "unet_lora_adapter_metadata": denoiser_cfg.to_dict()}
        te = text_encoders.get("text_encoder")
        if te is not None:
            kw["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
            kw["text_encoder_lora_adapter_metadata"] = te_cfgs["text_encoder"].to_dict()
        StableDiffusionPipeline.save_lora_weights(str(out), weight_name=LORA_FILE, safe_serialization=True, **kw)


BACKBONE = SDBackbone()

__all__ = ["BACKBONE", "SDBackbone", "UNET_TARGETS", "CLIP_TARGETS", "SD_SCHEDULER", "LORA_FILE",
           "build_clip_tokenizer", "ensure_tiny"]
