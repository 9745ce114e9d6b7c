"""Hunyuan-DiT behind the backbone interface: loading, tiny base, LoRA presets, the two text
encoders' conditioning, prediction and the stock ``HunyuanDiTPipeline``.

Hub id: ``Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers`` (its own licence, the Tencent Hunyuan
Community License, which the user must accept; see docs/architecture.md).

Conditioning, exactly as ``HunyuanDiTPipeline.encode_prompt`` makes it: the bilingual CLIP-like
``BertModel`` (``text_encoder`` / ``tokenizer``, padded to 77 tokens) and the mT5
``T5EncoderModel`` (``text_encoder_2`` / ``tokenizer_2``, padded to 256 tokens), each last
hidden state with its tokenizer's attention mask. The DiT's shapes fix both lengths
(``text_len`` / ``text_len_t5``: a learned padding table of 77 + 256 rows and the T5 attention
pool's positional embedding), so ``model.max_text_tokens`` does not change them. The prompts are
not lower-cased or otherwise preprocessed (the pipeline passes them to the tokenizers as given).

Per step (:func:`predict_noise`), as ``HunyuanDiTPipeline.__call__`` with
``use_resolution_binning=False`` builds them (binning would snap 512 px to 1024 px and resize
back; medsynth never bins): the 2D rotary embedding of the token grid
(``get_resize_crop_region_for_grid`` against the 512-px base grid), ``style`` = 0 and
``image_meta_size`` = original size (1024, 1024, the pipeline's default) + target size (the
generated size) + crop top-left (0, 0); the timestep in the latents' dtype. The model predicts
2*C channels (learned sigma); like the pipeline (and PixArt here) only the first C are used.

LoRA on the DiT only, as the paper: ``paper`` = ``to_q to_k to_v to_out.0``, which in
``HunyuanDiT2DModel`` are exactly the self- and cross-attention projections of the blocks
(``blocks.N.attn1`` / ``attn2``; the T5 attention pool names its layers ``q_proj`` / ``k_proj`` /
``v_proj`` / ``c_proj``, so it is not hit); ``attn_ff`` adds the blocks' feed-forward
``ff.net.0.proj ff.net.2``. Both text encoders stay frozen (``text_encoder_parts`` is empty):
``finetune.lora.text_encoder: true`` (the recipe default, for PixArt's T5) is ignored with a
warning from the finetune loop, and the conditioning is cached as for any frozen text encoder.

Output of a fine-tune: the PEFT folder ``transformer/`` only. diffusers 0.42 has no LoRA loader
for Hunyuan-DiT (``HunyuanDiTPipeline`` derives from ``DiffusionPipeline`` alone, no
``*LoraLoaderMixin``), so there is no ``pytorch_lora_weights.safetensors``; ``medsynth.load_finetuned``
applies the folder to a stock ``HunyuanDiTPipeline``.

Tiny base (``model.base: tiny`` with ``model.family: hunyuan-dit``): a small ``HunyuanDiT2DModel``
(with ``use_style_cond_and_image_meta_size`` on, as v1.1, so the style / size inputs are exercised;
v1.2 switches them off), a small ``BertModel`` with a WordPiece ``BertTokenizer`` whose vocabulary
is built in code from tiny.CORPUS and the recipe's texts, the tiny T5 and tokenizer of
:mod:`medsynth.models.tiny`, the autoencoder of ``model.tiny.autoencoder`` (it must downsample x8:
the pipeline computes the token grid as ``height // 8``) and a DDPM scheduler configured as
Hunyuan-DiT's; saved with ``HunyuanDiTPipeline.save_pretrained`` and loaded back through
:meth:`HunyuanDiTBackbone.load_part`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..workspace import atomic_write_json, sha256_json
from .backbone import Backbone, Cond

DIT_TARGETS: dict[str, list[str]] = {
    "paper": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}

CLIP_TOKENS = 77   # HunyuanDiTPipeline's max_sequence_length for the BERT encoder (text_len)
T5_TOKENS = 256    # ... and for mT5 (text_len_t5)
# __call__'s defaults, which use_resolution_binning=False leaves in place.
ORIGINAL_SIZE = (1024, 1024)
CROP_TOP_LEFT = (0, 0)
STYLE = 0

# The DDPM settings of Hunyuan-DiT v1.0 / v1.1 (scaled-linear betas 0.00085 -> 0.03, v-prediction),
# used only by the tiny base, which is v1.1-shaped (style and size conditioning on). Checked in part:
# Tencent's inference code asks weights <= v1.1 for `--beta-end 0.03` and v1.2 for its (different)
# default, so v1.2's beta_end is not 0.03. A real base always trains and samples with its own
# scheduler_config.json (tests/test_real_shaped_hunyuan.py checks that on a v1.2-shaped base).
HUNYUAN_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.03,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}

TINY_HUNYUAN_FORMAT = 1
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ----------------------------------------------------------------------------- conditioning


def _rotary(transformer, h_lat: int, w_lat: int, device):
    """The 2D rotary embedding HunyuanDiTPipeline builds for an (h, w) latent grid (pixels = latents * 8)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    p = transformer.config.patch_size
    grid = (h_lat // p, w_lat // p)
    base = 512 // 8 // p
    return get_2d_rotary_pos_embed(transformer.inner_dim // transformer.num_heads,
                                   get_resize_crop_region_for_grid(grid, base), grid, device=device,
                                   output_type="pt")


def predict_noise(transformer, latents: torch.Tensor, t, cond: Cond,
                  pixel_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The DiT's prediction (first C of its 2*C channels) with the pipeline's per-step inputs."""
    from ..sampling import unwrap

    model = unwrap(transformer)
    b = latents.shape[0]
    if not torch.is_tensor(t):
        t = torch.tensor([t])
    t = t.to(latents.device)
    if t.ndim == 0:
        t = t[None]
    if t.shape[0] != b:
        t = t.expand(b)
    # The pipeline casts the timestep to the latents' dtype before the timestep embedding.
    t = t.to(latents.dtype)
    h, w = pixel_size or (latents.shape[-2] * 8, latents.shape[-1] * 8)
    embeds = cond["embeds"]
    meta = torch.tensor([[*ORIGINAL_SIZE, h, w, *CROP_TOP_LEFT]], dtype=embeds.dtype,
                        device=latents.device).repeat(b, 1)
    style = torch.full((b,), STYLE, dtype=torch.long, device=latents.device)
    out = transformer(latents, t, encoder_hidden_states=embeds, text_embedding_mask=cond["mask"],
                      encoder_hidden_states_t5=cond["embeds_t5"], text_embedding_mask_t5=cond["mask_t5"],
                      image_meta_size=meta, style=style,
                      image_rotary_emb=_rotary(model, latents.shape[-2], latents.shape[-1], latents.device),
                      return_dict=False)[0]
    c = latents.shape[1]
    return out[:, :c] if out.shape[1] == 2 * c else out


def with_gradient_checkpointing(model):
    """Let ``model.enable_gradient_checkpointing()`` work on a ``HunyuanDiT2DModel``; returns ``model``.

    diffusers 0.42's HunyuanDiT2DModel does not support it (``_supports_gradient_checkpointing`` is
    False and enabling raises ValueError), yet ``finetune.gradient_checkpointing`` is on by default and
    HLDF backpropagates through M solver steps of the DiT, so without it a real-sized base does not fit.
    The instance gets what diffusers' other DiTs have: a ``gradient_checkpointing`` flag per block
    (diffusers' ``_set_gradient_checkpointing`` switches it) and a per-instance ``forward`` that recomputes
    the block in backward while grad is enabled. Class, parameter names and outputs stay the stock
    model's, so LoRA folders and saved weights load into a stock pipeline. A diffusers version whose
    model supports checkpointing itself is left alone.
    """
    import types

    if type(model)._supports_gradient_checkpointing:
        return model
    for block in model.blocks:
        if "forward" not in vars(block):
            block.gradient_checkpointing = False
            block.forward = types.MethodType(_checkpointed_block_forward, block)
    model._supports_gradient_checkpointing = True
    return model


def _checkpointed_block_forward(self, hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None,
                                skip=None):
    forward = type(self).forward
    if self.gradient_checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, skip,
                          use_reentrant=False)
    return forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, skip)


def _encode_one(tokenizer, text_encoder, prompts: list[str], length: int, device):
    enc = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_attention_mask=True,
                    return_tensors="pt")
    mask = enc.attention_mask.to(device)
    return text_encoder(enc.input_ids.to(device), attention_mask=mask)[0], mask


# ----------------------------------------------------------------------------- tiny base


def build_bert_tokenizer(recipe):
    """A WordPiece ``BertTokenizer`` (lower-casing, 77 tokens) whose vocabulary is made here from
    tiny.CORPUS and the recipe's class texts: BERT's special tokens, every character alone and as a
    ``##`` continuation, then the whole words, most frequent first, up to ``model.tiny.vocab_size``."""
    from collections import Counter

    from transformers import BertTokenizer

    from .tiny import _ALPHABET, tokenizer_corpus, tokenizer_inputs

    inp = tokenizer_inputs(recipe)
    lines = tokenizer_corpus(recipe)
    # BERT's basic tokenizer splits on whitespace and punctuation after lower-casing.
    words = Counter(w for ln in lines for w in re.findall(r"\w+|[^\w\s]", ln.lower()))
    chars = sorted({c.lower() for c in _ALPHABET} | {c for w in words for c in w})
    pieces = list(_BERT_SPECIALS) + chars + ["##" + c for c in chars]
    budget = max(0, inp["vocab_size"] - len(pieces))
    pieces += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:budget]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=CLIP_TOKENS)


def bert_config(recipe, tokenizer) -> dict:
    tiny = recipe.model.tiny
    return dict(vocab_size=len(tokenizer), hidden_size=tiny.text_dim, num_hidden_layers=tiny.text_layers,
                num_attention_heads=tiny.heads, intermediate_size=4 * tiny.text_dim,
                max_position_embeddings=CLIP_TOKENS, pad_token_id=tokenizer.pad_token_id,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def transformer_config(recipe) -> dict:
    from . import tiny as T

    t = recipe.model.tiny
    width = t.heads * t.head_dim
    return dict(num_attention_heads=t.heads, attention_head_dim=t.head_dim, in_channels=T.latent_channels(t),
                patch_size=T.dit_patch_size(t), sample_size=recipe.model.resolution // 8, hidden_size=width,
                num_layers=t.layers, mlp_ratio=4.0, learn_sigma=True, cross_attention_dim=t.text_dim,
                cross_attention_dim_t5=t.text_dim, pooled_projection_dim=t.text_dim, text_len=CLIP_TOKENS,
                text_len_t5=T5_TOKENS, use_style_cond_and_image_meta_size=True)


def scheduler_config(recipe) -> dict:
    return {**HUNYUAN_SCHEDULER, "prediction_type": recipe.model.tiny.prediction_type}


def tiny_dir(recipe) -> Path:
    from .tiny import base_inputs

    key = sha256_json({"family": "hunyuan-dit", "format": TINY_HUNYUAN_FORMAT, **base_inputs(recipe)})[:16]
    return recipe.workdir_path / "tiny-base" / f"hunyuan-dit-{key}"


def _check_geometry(recipe) -> None:
    from . import tiny as T

    t, res = recipe.model.tiny, recipe.model.resolution
    f, p = T.vae_factor(t), T.dit_patch_size(t)
    if f != 8:
        raise UserError(f"model.tiny.vae_channels {t.vae_channels} downsample x{f}, but HunyuanDiTPipeline assumes an "
                        "x8 autoencoder (its token grid is height // 8); set model.tiny.autoencoder=taef2, or give the "
                        "fitted VAE 4 levels, e.g. --set model.tiny.vae_channels=[8,16,32,32]")
    if res % (8 * p):
        raise UserError(f"model.resolution {res} does not suit the tiny Hunyuan-DiT base: with an x8 autoencoder and "
                        f"patch size {p} it must be a multiple of {8 * p}; e.g. --set model.resolution="
                        f"{max(8 * p, res // (8 * p) * 8 * p)}")
    if t.head_dim % 4:
        raise UserError(f"model.tiny.head_dim {t.head_dim} must be a multiple of 4 for Hunyuan-DiT's 2D rotary "
                        "embedding (half the head per axis, in pairs); e.g. --set model.tiny.head_dim=8")
    if t.text_dim % t.heads or t.text_dim % 8:
        raise UserError(f"model.tiny.text_dim {t.text_dim} must be a multiple of model.tiny.heads {t.heads} and of 8 "
                        "(Hunyuan-DiT pools the T5 states with 8 attention heads); e.g. --set model.tiny.text_dim=32")


def ensure_tiny(recipe) -> Path:
    """The cached tiny Hunyuan-DiT base for this recipe and workspace, built on first use."""
    from .. import console
    from ..data import read_manifest
    from . import tiny as T
    from .sd import _tiny_vae

    final = tiny_dir(recipe)
    if (final / T.INFO_FILE).is_file():
        return final
    _check_geometry(recipe)
    console.info(f"tiny base: building {final} (Hunyuan-DiT layout, once per data set and settings)")
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    with T._building(final) as tmp:
        tokenizer = build_bert_tokenizer(recipe)
        tokenizer_2 = T.build_tokenizer(recipe)
        rows = read_manifest(recipe.workdir_path, "train")
        images = T.load_images([r.path for r in rows], recipe.model.resolution)
        vae, vae_stats = _tiny_vae(recipe, images)
        torch.manual_seed(recipe.seed)
        transformer = HunyuanDiT2DModel(**transformer_config(recipe))
        torch.manual_seed(recipe.seed + 1)
        text_encoder = BertModel(BertConfig(**bert_config(recipe, tokenizer))).eval()
        torch.manual_seed(recipe.seed + 4)
        text_encoder_2 = T5EncoderModel(T5Config(**T.text_config(recipe, len(tokenizer_2)))).eval()
        pipe = HunyuanDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                  scheduler=DDPMScheduler(**scheduler_config(recipe)), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False,
                                  text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        atomic_write_json(tmp / T.INFO_FILE, {
            "family": "hunyuan-dit", "format": TINY_HUNYUAN_FORMAT, "tokenizer_vocab": len(tokenizer),
            "tokenizer_2_vocab": len(tokenizer_2), "vae": vae_stats,
            "parameters": {"transformer": count(transformer), "text_encoder": count(text_encoder),
                           "text_encoder_2": count(text_encoder_2), "vae": count(vae)},
        })
    return final


# ----------------------------------------------------------------------------- the backbone


class HunyuanDiTBackbone(Backbone):
    name = "hunyuan-dit"
    label = "Hunyuan-DiT"
    hub_example = "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"
    parts = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler")
    denoiser_part = "transformer"
    text_encoder_parts = ()  # both encoders frozen (the paper trains LoRA on the DiT only)
    layout = "model_index.json, transformer/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, vae/, scheduler/"
    lora_presets = {"denoiser": DIT_TARGETS}
    part_classes = {"transformer": "diffusers.HunyuanDiT2DModel", "text_encoder": "transformers.BertModel",
                    "text_encoder_2": "transformers.T5EncoderModel"}
    scheduler_class = "DDPMScheduler"  # what Hunyuan-DiT ships

    def prepare_part(self, part: str, model):
        return with_gradient_checkpointing(model) if part == self.denoiser_part else model

    def build_tiny(self, recipe) -> Path:
        return ensure_tiny(recipe)

    def tiny_dir(self, recipe) -> Path:
        return tiny_dir(recipe)

    def encode(self, comps, prompts: Sequence[str], max_length: int, device, labels=None) -> Cond:
        # Under no_grad: both encoders are frozen by design and the loop does not freeze parts that
        # are not in text_encoder_parts, so their weights would otherwise collect gradients.
        prompts = list(prompts)
        with torch.no_grad():
            return self._encode(comps, prompts, device)

    def _encode(self, comps, prompts: list[str], device) -> Cond:
        embeds, mask = _encode_one(comps.tokenizer, comps.text_encoder, prompts, CLIP_TOKENS, device)
        embeds_t5, mask_t5 = _encode_one(comps.tokenizer_2, comps.text_encoder_2, prompts, T5_TOKENS, device)
        return Cond({"embeds": embeds, "mask": mask, "embeds_t5": embeds_t5, "mask_t5": mask_t5})

    def predict(self, denoiser, latents, t, cond: Cond, pixel_size=None):
        return predict_noise(denoiser, latents, t, cond, pixel_size)

    def stock_pipeline(self, comps, scheduler=None):
        from diffusers import HunyuanDiTPipeline

        return HunyuanDiTPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                  transformer=comps.transformer, scheduler=scheduler or comps.scheduler,
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                  text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2)

    def pipeline_generate(self, pipe, cond: Cond, neg: Cond | None, latents, *, steps, guidance, resolution):
        kwargs = {}
        if neg is not None:
            kwargs = dict(negative_prompt_embeds=neg["embeds"], negative_prompt_attention_mask=neg["mask"],
                          negative_prompt_embeds_2=neg["embeds_t5"], negative_prompt_attention_mask_2=neg["mask_t5"])
        return pipe(prompt_embeds=cond["embeds"], prompt_attention_mask=cond["mask"],
                    prompt_embeds_2=cond["embeds_t5"], prompt_attention_mask_2=cond["mask_t5"], latents=latents,
                    num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                    # Binning would snap 512 px to 1024 px and resize the images back.
                    use_resolution_binning=False, output_type="np", return_dict=False, **kwargs)[0]


BACKBONE = HunyuanDiTBackbone()

__all__ = ["BACKBONE", "HunyuanDiTBackbone", "DIT_TARGETS", "HUNYUAN_SCHEDULER", "predict_noise",
           "with_gradient_checkpointing", "build_bert_tokenizer", "ensure_tiny"]
