"""PixArt (α 512 / 1024-MS; Σ) behind the backbone interface: loading, tiny base, LoRA presets,
T5 conditioning, prediction and the stock pipeline (``PixArtAlphaPipeline``, or
``PixArtSigmaPipeline`` when the base's model_index.json names it).

PixArt-Σ. Same parts and classes as α (``PixArtTransformer2DModel``, T5, VAE), so loading,
fine-tuning and prediction are shared; only the stock pipeline and the token limit differ. Σ was
trained with 300 T5 tokens but ``model.max_text_tokens`` defaults to α's 120 (the recipe default is
not per base): a Σ base encoded with fewer than 300 tokens gets one warning naming the fix,
``--set model.max_text_tokens=300``.

LoRA presets. ``PixArtTransformer2DModel`` has no ``add_adapter``; peft's
``inject_adapter_in_model`` adds the layers in place (:func:`medsynth.finetune.lora.add_lora`).
peft matches a target against the *end* of a module name.

DiT presets (``finetune.lora.transformer_targets``):

``paper`` — the list of the official Med-Art / PixArt LoRA training script:
``to_k to_q to_v to_out.0 proj_in proj_out ff.net.0.proj ff.net.2 proj linear linear_1 linear_2``.
In ``PixArtTransformer2DModel`` that hits
  - every attention projection (self- and cross-attention: ``attn1/attn2.to_q/to_k/to_v/to_out.0``),
  - the feed-forward layers ``ff.net.0.proj`` and ``ff.net.2``,
  - the patch embedder ``pos_embed.proj`` (a Conv2d; "proj"),
  - adaLN-single: ``adaln_single.linear`` ("linear") and the timestep MLP
    ``adaln_single.emb.timestep_embedder.linear_1/linear_2``,
  - the caption projection ``caption_projection.linear_1/linear_2``,
  - the output projection ``proj_out``.
``proj_in`` matches nothing in PixArt (kept for parity with the official list).

``attn_ff`` — attention projections and feed-forward layers only, as the paper's text says.

T5 presets (``finetune.lora.text_encoder_targets``): ``full`` = ``q k v o wi_0 wi_1 wo`` (T5 v1.1,
which PixArt uses, has a gated FFN with ``wi_0``/``wi_1``); ``paper_parity`` = ``q k v o wi wo``,
the official list, whose ``wi`` matches no module of T5 v1.1, so the FFN input projections stay
frozen there.

Output of a fine-tune: PEFT folders (diffusers has no LoRA loader for PixArt), applied by
:func:`medsynth.finetune.adapters.load_finetuned` to a stock ``PixArtAlphaPipeline`` or
``PixArtSigmaPipeline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .. import console
from .backbone import Backbone, Cond, index_class_name

SIGMA_PIPELINE = "PixArtSigmaPipeline"
# The T5 token limit PixArt-Σ was trained with (diffusers' PixArtSigmaPipeline default).
SIGMA_TEXT_TOKENS = 300
_warned_bases: set[str] = set()


def is_sigma(base: str | None) -> bool:
    """Whether ``base`` (a resolved id or directory) is a PixArt-Σ: its model_index.json says
    ``PixArtSigmaPipeline``. An unreadable index (or no base) counts as α, the default."""
    if not base:
        return False
    from .loading import _is_local, is_offline

    return index_class_name(base, local_files_only=is_offline() or _is_local(base)) == SIGMA_PIPELINE


def warn_sigma_token_limit(base: str | None, max_length: int) -> None:
    """Warn once per base when a PixArt-Σ runs with fewer T5 tokens than it was trained with."""
    if not base or base in _warned_bases or max_length >= SIGMA_TEXT_TOKENS:
        return
    _warned_bases.add(base)  # also for α: the index is read once per base
    if is_sigma(base):
        console.warn(f"model.base {base} is a PixArt-Σ ({SIGMA_PIPELINE}), trained with {SIGMA_TEXT_TOKENS} T5 "
                     f"tokens, but model.max_text_tokens is {max_length}: longer prompts are cut there. "
                     f"Fix: --set model.max_text_tokens={SIGMA_TEXT_TOKENS} (or model.max_text_tokens: "
                     f"{SIGMA_TEXT_TOKENS} in the recipe)")

DIT_TARGETS: dict[str, list[str]] = {
    "paper": ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
              "proj", "linear", "linear_1", "linear_2"],
    "attn_ff": ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}

T5_TARGETS: dict[str, list[str]] = {
    "full": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "paper_parity": ["q", "k", "v", "o", "wi", "wo"],
}


def uses_micro_conditions(transformer) -> bool:
    """Whether the DiT takes resolution / aspect-ratio conditions (PixArt-XL-2-1024-MS).

    The flag is the module attribute ``use_additional_conditions``: diffusers derives it in
    ``__init__`` (true when ``sample_size == 128``) and leaves the config value as given, which is
    ``None`` in the hub configs. The config is only read for a module without the attribute.
    """
    from ..sampling import unwrap

    model = unwrap(transformer)
    flag = getattr(model, "use_additional_conditions", None)
    if flag is None:
        flag = getattr(getattr(model, "config", None), "use_additional_conditions", None)
    return bool(flag)


def predict_noise(transformer, latents: torch.Tensor, t, embeds: torch.Tensor, mask: torch.Tensor | None,
                  pixel_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The PixArt transformer's prediction (epsilon, or v / x0 as the scheduler's
    ``prediction_type`` says; see ``sampling.training_target``), the learned-sigma half dropped.

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


def encode_text(tokenizer, text_encoder, prompts: Sequence[str], max_length: int, device):
    """T5 embeddings + attention mask exactly as synthesis makes them (lower-cased, padded to
    ``max_length``): training and generation must see the same text preprocessing.

    Not wrapped in no_grad on purpose: finetune calls it with grad when T5 carries LoRA.
    """
    from .loading import encode_prompts

    return encode_prompts(tokenizer, text_encoder, list(prompts), max_length, device)


class PixArtBackbone(Backbone):
    name = "pixart"
    label = "PixArt-alpha"
    hub_example = "PixArt-alpha/PixArt-XL-2-512x512"
    parts = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
    denoiser_part = "transformer"
    text_encoder_parts = ("text_encoder",)
    layout = "model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/"
    lora_presets = {"denoiser": DIT_TARGETS, "text_encoder": T5_TARGETS}
    part_classes = {"transformer": "diffusers.PixArtTransformer2DModel", "text_encoder": "transformers.T5EncoderModel"}
    scheduler_class = "DPMSolverMultistepScheduler"

    def build_tiny(self, recipe) -> Path:
        from .tiny import ensure_tiny_base

        return ensure_tiny_base(recipe)

    def check_recipe(self, recipe, base: str) -> None:
        warn_sigma_token_limit(base, recipe.model.max_text_tokens)

    def caption_tokenizer_base(self, recipe) -> str:
        # The tiny base's tokenizer alone: the caption stage need not build the model (nor fit a VAE).
        from .loading import resolve_base
        from .tiny import tokenizer_dir

        return str(tokenizer_dir(recipe).resolve()) if recipe.model.base.strip() == "tiny" else resolve_base(recipe)

    def caption_token_limit(self, recipe, tokenizer) -> int:
        # T5 has relative positions: model.max_text_tokens is the limit, whatever the tokenizer's config says.
        return int(recipe.model.max_text_tokens)

    def encode(self, comps, prompts: Sequence[str], max_length: int, device, labels=None) -> Cond:
        embeds, mask = encode_text(comps.tokenizer, comps.text_encoder, prompts, max_length, device)
        return Cond({"embeds": embeds, "mask": mask})

    def predict(self, denoiser, latents, t, cond: Cond, pixel_size=None):
        return predict_noise(denoiser, latents, t, cond["embeds"], cond["mask"], pixel_size)

    def stock_pipeline(self, comps, scheduler=None):
        """``PixArtSigmaPipeline`` for a Σ base (model_index.json), else ``PixArtAlphaPipeline``."""
        from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

        cls = PixArtSigmaPipeline if is_sigma(comps.base) else PixArtAlphaPipeline
        return cls(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
                   transformer=comps.transformer, scheduler=scheduler or comps.scheduler)

    def pipeline_generate(self, pipe, cond: Cond, neg: Cond | None, latents, *, steps, guidance, resolution):
        kwargs = {}
        if neg is not None:
            kwargs["negative_prompt_embeds"] = neg["embeds"]
            kwargs["negative_prompt_attention_mask"] = neg["mask"]
        return pipe(
            prompt_embeds=cond["embeds"], prompt_attention_mask=cond["mask"], negative_prompt=None, latents=latents,
            num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
            # The token limit the embeddings were encoded with, so that nothing the pipeline tokenizes
            # itself falls back to its own default (Σ: 300, α: 120).
            max_sequence_length=cond["embeds"].shape[1],
            # Binning would snap a custom resolution to PixArt's aspect-ratio table and resize back.
            use_resolution_binning=False, output_type="np", return_dict=False, **kwargs,
        )[0]


BACKBONE = PixArtBackbone()

__all__ = ["BACKBONE", "PixArtBackbone", "DIT_TARGETS", "T5_TARGETS", "uses_micro_conditions", "predict_noise",
           "encode_text", "is_sigma", "warn_sigma_token_limit", "SIGMA_PIPELINE", "SIGMA_TEXT_TOKENS"]
