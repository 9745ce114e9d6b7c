"""Sana (NVIDIA / MIT Han Lab) behind the backbone interface: SanaTransformer2DModel (linear-attention
DiT) + Gemma-2 text encoder + the DC-AE autoencoder (``AutoencoderDC``), with ``SanaPipeline`` as
the stock pipeline and ``pipe.load_lora_weights`` (``SanaLoraLoaderMixin``) for the output.

Hub ids: ``Efficient-Large-Model/Sana_600M_512px_diffusers`` (also ``Sana_600M_1024px_diffusers``,
``Sana_1600M_512px_diffusers``, ``Sana_1600M_1024px_diffusers``).

Scheduler and training target (checked against diffusers 0.42 and its
scripts/convert_sana_to_diffusers.py). A Sana base ships ``DPMSolverMultistepScheduler`` configured
for rectified flow: ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``,
``flow_shift=3.0`` (512 / 1024 px), ``algorithm_type="dpmsolver++"``. The noisy latent at noise
level sigma is ``(1 - sigma) * x0 + sigma * noise`` and the transformer predicts the velocity
``noise - x0``; its timestep input is ``1000 * sigma`` (the scheduler's ``timesteps``) times the
config's ``timestep_scale`` (1.0 for Sana, as ``SanaPipeline.__call__`` applies it).

- Sampling: the interface's DPM-Solver++ made ``from_config`` of that file *is* SanaPipeline's
  sampler (the flow sigmas and ``flow_prediction`` come from the config), so medsynth's loop and
  the stock pipeline agree step for step (tests/test_family_sana.py checks <= 1e-4).
- Training (:class:`FlowMatchTraining`): the finetune loop draws integer ``t`` uniformly in
  [0, 1000) and uses ``sigma = t / 1000``, ``x_t = (1 - sigma) x0 + sigma noise``, target
  ``noise - x0`` (``sampling.training_target`` for ``flow_prediction``), timestep ``t``: diffusers'
  train_dreambooth_lora_sana.py with its default uniform weighting (it draws from the
  FlowMatchEuler table, sigma in {0.001 .. 1}; the loop's {0 .. 0.999} is the same grid shifted by
  one of its 1000 steps). HLDF samples with the same DPM-Solver++ as synthesis.

Conditioning, as ``SanaPipeline.encode_prompt`` with ``complex_human_instruction=None``: the
prompt lower-cased and stripped, Gemma-tokenized with a BOS, right-padded / truncated to
``model.max_text_tokens`` (Sana's default is 300), the Gemma-2 model's last hidden state and the
attention mask. Why not Sana's default ``complex_human_instruction``: ``SanaPipeline.__call__``
prepends a ~250-token "enhance this prompt" instruction to every prompt (and keeps only the
prompt's tokens afterwards); medsynth's captions are already descriptive and class-templated, the
instruction multiplies the text encoder's cost per caption (in training too), and the Sana LoRA
training script encodes its training prompts the same plain way. A user reproducing medsynth's
images with the stock pipeline passes ``complex_human_instruction=None`` (or the embeddings).

LoRA on the transformer only: ``paper`` = ``to_q to_k to_v``, the default ``--lora_layers`` of
diffusers' train_dreambooth_lora_sana.py (they hit the linear self-attention ``attn1`` and the
cross-attention ``attn2`` of every block); ``attn_out`` adds ``to_out.0``. Gemma-2 stays frozen
(``text_encoder_parts`` is empty): ``SanaLoraLoaderMixin`` loads the transformer only
(``_lora_loadable_modules = ["transformer"]``), so a Gemma LoRA could not travel in the file a stock
pipeline loads; ``finetune.lora.text_encoder: true`` (the recipe default) is ignored with a warning
from the finetune loop. The output is the PEFT folder ``transformer/`` plus
``pytorch_lora_weights.safetensors`` written with ``SanaPipeline.save_lora_weights`` (the peft
state dict as the Sana training script saves it, with the LoraConfig as adapter metadata so the
loader restores alpha), so ``pipe.load_lora_weights(final_dir)`` works.

The autoencoder: ``AutoencoderDC`` encodes deterministically (``encode(x).latent``); medsynth's
finetune loop reads ``encode(x).latent_dist`` (AutoencoderKL's), so the VAE is loaded as
:class:`DCAutoencoder`, an ``AutoencoderDC`` whose ``encode`` returns that latent as a zero-width
Gaussian (mean = the latent; log-variance -30, which the loop's own clamp keeps: a noise of
3e-7 of the latent scale). Its weights and config are DC-AE's own, and the stock pipeline only
decodes. Sana decodes ``latents / scaling_factor`` (no shift). ``AutoencoderDC`` cannot checkpoint
(its ``enable_gradient_checkpointing`` raises), so :class:`DCAutoencoder` makes that call a no-op:
``finetune.gradient_checkpointing`` (default true) then checkpoints the transformer only.

Tiny base (``model.base: tiny`` with ``model.family: sana``): a small SanaTransformer2DModel and
Gemma2Model from configs, a ``GemmaTokenizer`` whose BPE merges are learned offline
(``tiny.learn_bpe_merges``, deterministic) from tiny.CORPUS and the recipe's texts, with Gemma's
special ids and byte fallback,
a small random (seeded) ``AutoencoderDC`` (x8, 32 latent channels like DC-AE's c32) whose
``scaling_factor`` is measured on the train images, and Sana's scheduler. TAEF2 cannot serve:
``SanaPipeline`` computes its VAE scale from ``vae.config.encoder_block_out_channels``, a key only
``AutoencoderDC`` has, so the stock pipeline fails on any other autoencoder. The VAE is not fitted
(a DC-AE fit is not worth the demo's time: the tiny base exists for the code paths).
``model.tiny.prediction_type`` does not apply (Sana is flow matching). Saved with
``SanaPipeline.save_pretrained`` and loaded back through :meth:`SanaBackbone.load_part`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..workspace import atomic_write_json, sha256_json
from .backbone import Backbone, Cond

DIT_TARGETS: dict[str, list[str]] = {
    "paper": ["to_q", "to_k", "to_v"],
    "attn_out": ["to_q", "to_k", "to_v", "to_out.0"],
}

# scheduler/scheduler_config.json of the Sana 512 / 1024 px bases, as convert_sana_to_diffusers.py
# makes it: DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
# prediction_type="flow_prediction"), every other setting the class default (dpmsolver++, order 2).
SANA_SCHEDULER = {"flow_shift": 3.0, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}
LATENT_CHANNELS = 32       # DC-AE f32c32's latent channels (the tiny x8 autoencoder keeps them)
TINY_VAE_FACTOR = 8
TINY_SANA_FORMAT = 1
LORA_FILE = "pytorch_lora_weights.safetensors"
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4, as Gemma's tokenizer


# ----------------------------------------------------------------------------- the autoencoder


@functools.cache
def dc_autoencoder_class():
    """:class:`DCAutoencoder` (built on first use: diffusers stays a lazy import)."""
    from diffusers import AutoencoderDC
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    class DCAutoencoder(AutoencoderDC):
        """AutoencoderDC whose ``encode`` answers as AutoencoderKL's (``latent_dist``): see the module doc."""

        def encode(self, x: torch.Tensor, return_dict: bool = True):
            z = super().encode(x, return_dict=False)[0]
            dist = DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -30.0)], dim=1))
            return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

        def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
            # AutoencoderDC has no checkpointable blocks in diffusers 0.42 (_supports_gradient_checkpointing
            # is False, so the stock method raises); finetune.gradient_checkpointing (default true) asks
            # every VAE for it, and for DC-AE it can only mean: keep the decode's activations.
            pass

    DCAutoencoder.__name__ = DCAutoencoder.__qualname__ = "DCAutoencoder"
    return DCAutoencoder


# ----------------------------------------------------------------------------- training schedule


class FlowMatchTraining:
    """The rectified-flow noising of diffusers' Sana training script for the finetune loop:
    ``add_noise(x0, noise, t)`` = ``(1 - sigma) x0 + sigma noise`` with ``sigma = t / N``, and a
    ``config`` whose ``prediction_type`` is ``flow_prediction`` (target ``noise - x0``)."""

    def __init__(self, scheduler_config):
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict({**dict(scheduler_config), "prediction_type": "flow_prediction"})

    def sigmas(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        s = t.to(torch.float32) / self.config.num_train_timesteps
        return s.reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigmas(t, x0.ndim).to(x0.device)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


# ----------------------------------------------------------------------------- tiny base


def build_gemma_tokenizer(recipe):
    """A ``GemmaTokenizer`` trained offline on tiny.CORPUS plus the recipe's class texts."""
    from .tiny import tokenizer_corpus, tokenizer_inputs

    inp = tokenizer_inputs(recipe)
    lines = tokenizer_corpus(recipe)
    return train_gemma_tokenizer(lines, inp["vocab_size"], model_max_length=inp["max_text_tokens"],
                                 padding_side="right")


def train_gemma_tokenizer(lines: Sequence[str], vocab_size: int, **kwargs):
    """A ``GemmaTokenizer`` (BPE with byte fallback, Gemma's special ids, ``<bos>`` first and no
    ``<eos>``) whose merges are learned offline from ``lines`` (lower-cased, as SanaPipeline lower-cases
    prompts); ``kwargs`` go to the tokenizer (model_max_length, padding_side)."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import GemmaTokenizer

    from .tiny import _ALPHABET, learn_bpe_merges

    # Gemma's normaliser (spaces -> "▁"); words split before each "▁" so no merge crosses a word.
    norm, split = normalizers.Replace(" ", "▁"), pre_tokenizers.Split("▁", behavior="merged_with_next")
    words = Counter(w for ln in lines for w, _ in split.pre_tokenize_str(norm.normalize_str(ln.lower())))
    alphabet = sorted({*_ALPHABET, "▁"} | {c for w in words for c in w})
    # Gemma's layout: the special tokens, the 256 byte-fallback pieces, then the learned pieces.
    vocab: dict[str, int] = {}
    for piece in GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + alphabet:
        vocab.setdefault(piece, len(vocab))
    merges = learn_bpe_merges(words, max(0, vocab_size - len(alphabet)))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, **kwargs)


def transformer_config(recipe) -> dict:
    """Sana's transformer layout (linear self-attention, cross-attention, GLUMBConv FFN), narrow and
    shallow; Sana 600M: 36 x 32 self-attention, 16 x 72 cross-attention, 28 layers, mlp_ratio 2.5,
    no positional embedding at 512 / 1024 px (interpolation_scale None), patch size 1."""
    t = recipe.model.tiny
    width = t.heads * t.head_dim
    return dict(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=t.heads,
        attention_head_dim=t.head_dim, num_layers=t.layers, num_cross_attention_heads=t.heads,
        cross_attention_head_dim=t.head_dim, cross_attention_dim=width, caption_channels=t.text_dim,
        mlp_ratio=2.5, attention_bias=False, sample_size=recipe.model.resolution // TINY_VAE_FACTOR, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
    )


def gemma_config(recipe, tokenizer) -> dict:
    """Gemma-2's architecture (GQA, soft-capped attention, sliding window on alternate layers), tiny."""
    t = recipe.model.tiny
    head_dim = t.text_dim // t.heads
    return dict(
        vocab_size=len(tokenizer), hidden_size=t.text_dim, intermediate_size=4 * t.text_dim,
        num_hidden_layers=t.text_layers, num_attention_heads=t.heads, num_key_value_heads=max(1, t.heads // 2),
        head_dim=head_dim, max_position_embeddings=max(512, recipe.model.max_text_tokens), query_pre_attn_scalar=head_dim,
        sliding_window=max(16, recipe.model.max_text_tokens // 2), attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", attention_dropout=0.0,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, use_cache=False,
    )


def autoencoder_config() -> dict:
    """A small DC-AE: four levels (x8), ResBlocks then one EfficientViT (linear-attention) level, as
    DC-AE mixes them; 32 latent channels (DC-AE's shortcuts need the last width a multiple of them)."""
    return dict(
        in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,)), decoder_qkv_multiscales=((), (), (), (5,)),
        upsample_block_type="interpolate", downsample_block_type="conv",
    )


def _measure_scaling_factor(vae, images) -> float:
    """1 / std of the train images' latents, so scaled latents have unit variance as the solver assumes."""
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 32]).latent for i in range(0, len(images), 32)])
    return float(1.0 / z.float().std().clamp_min(1e-6))


def tiny_dir(recipe) -> Path:
    from .tiny import base_inputs

    key = sha256_json({"family": "sana", "format": TINY_SANA_FORMAT, **base_inputs(recipe)})[:16]
    return recipe.workdir_path / "tiny-base" / f"sana-{key}"


def _check_geometry(recipe) -> None:
    t, res = recipe.model.tiny, recipe.model.resolution
    if res % TINY_VAE_FACTOR:
        raise UserError(f"model.resolution {res} does not suit the tiny Sana base: its autoencoder downsamples "
                        f"x{TINY_VAE_FACTOR}, so it must be a multiple of {TINY_VAE_FACTOR}; e.g. --set "
                        f"model.resolution={max(TINY_VAE_FACTOR, res // TINY_VAE_FACTOR * TINY_VAE_FACTOR)}")
    if t.text_dim % t.heads or (t.text_dim // t.heads) % 2:
        raise UserError(f"model.tiny.text_dim {t.text_dim} must be a multiple of 2 x model.tiny.heads {t.heads} (the "
                        "tiny Gemma-2 uses the same head count and rotary embeddings need an even head size); e.g. "
                        "--set model.tiny.text_dim=32")


def ensure_tiny(recipe) -> Path:
    """The cached tiny Sana base for this recipe and workspace, built on first use."""
    from .. import console
    from ..data import read_manifest
    from . import tiny as T

    final = tiny_dir(recipe)
    if (final / T.INFO_FILE).is_file():
        return final
    _check_geometry(recipe)
    console.info(f"tiny base: building {final} (Sana layout, once per data set and settings)")
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    with T._building(final) as tmp:
        tokenizer = build_gemma_tokenizer(recipe)
        rows = read_manifest(recipe.workdir_path, "train")
        images = T.load_images([r.path for r in rows], recipe.model.resolution)
        torch.manual_seed(recipe.seed + 2)
        vae = AutoencoderDC(**autoencoder_config()).eval()
        scale = _measure_scaling_factor(vae, images)
        vae.register_to_config(scaling_factor=scale)
        torch.manual_seed(recipe.seed)
        transformer = SanaTransformer2DModel(**transformer_config(recipe))
        torch.manual_seed(recipe.seed + 1)
        text_encoder = Gemma2Model(Gemma2Config(**gemma_config(recipe, tokenizer))).eval()
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER))
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        atomic_write_json(tmp / T.INFO_FILE, {
            "family": "sana", "format": TINY_SANA_FORMAT, "tokenizer_vocab": len(tokenizer),
            "vae": {"autoencoder": "random AutoencoderDC", "scaling_factor": round(scale, 6)},
            "parameters": {"transformer": count(transformer), "text_encoder": count(text_encoder), "vae": count(vae)},
        })
    return final


# ----------------------------------------------------------------------------- the backbone


def predict_velocity(denoiser, latents: torch.Tensor, t, cond: Cond) -> torch.Tensor:
    """The transformer's output as ``SanaPipeline.__call__`` computes it: timestep broadcast to the
    batch and multiplied by ``timestep_scale``; a learned-sigma half (none in Sana) dropped."""
    from ..sampling import unwrap

    cfg = unwrap(denoiser).config
    t = torch.as_tensor(t, device=latents.device)
    t = (t.expand(latents.shape[0]) if t.ndim == 0 else t.to(latents.device)) * cfg.timestep_scale
    out = denoiser(latents, encoder_hidden_states=cond["embeds"], encoder_attention_mask=cond["mask"],
                   timestep=t, return_dict=False)[0]
    if out.shape[1] == 2 * latents.shape[1]:
        out = out.chunk(2, dim=1)[0]
    return out


class SanaBackbone(Backbone):
    name = "sana"
    label = "Sana"
    hub_example = "Efficient-Large-Model/Sana_600M_512px_diffusers"
    parts = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
    denoiser_part = "transformer"
    text_encoder_parts = ()  # Gemma-2 frozen: SanaLoraLoaderMixin loads transformer LoRA only
    layout = "model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/"
    lora_presets = {"denoiser": DIT_TARGETS}
    part_classes = {"transformer": "diffusers.SanaTransformer2DModel", "text_encoder": "transformers.Gemma2Model"}
    scheduler_class = "DPMSolverMultistepScheduler"  # what Sana ships (flow sigmas)

    def load_part(self, part: str, base: str, kw: dict, dtype):
        if part == "vae":
            from .loading import diffusers_dtype_kw

            return dc_autoencoder_class().from_pretrained(base, **diffusers_dtype_kw(dtype), **kw)
        return super().load_part(part, base, kw, dtype)

    def build_tiny(self, recipe) -> Path:
        return ensure_tiny(recipe)

    def tiny_dir(self, recipe) -> Path:
        return tiny_dir(recipe)

    def vae_scale(self, vae) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)  # as SanaPipeline computes it

    def training_scheduler(self, scheduler_config):
        if scheduler_config.get("prediction_type") == "flow_prediction":
            return FlowMatchTraining(scheduler_config)
        return super().training_scheduler(scheduler_config)

    def encode(self, comps, prompts: Sequence[str], max_length: int, device, labels=None) -> Cond:
        # Under no_grad: Gemma-2 is frozen by design, and the loop freezes only text_encoder_parts.
        tok = comps.tokenizer
        tok.padding_side = "right"  # as SanaPipeline sets it (Gemma's own default is left)
        texts = [p.lower().strip() for p in prompts]  # SanaPipeline._text_preprocessing, clean_caption=False
        enc = tok(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
        mask = enc.attention_mask.to(device)
        with torch.no_grad():
            embeds = comps.text_encoder(enc.input_ids.to(device), attention_mask=mask)[0]
        return Cond({"embeds": embeds, "mask": mask})

    def predict(self, denoiser, latents, t, cond: Cond, pixel_size=None):
        return predict_velocity(denoiser, latents, t, cond)

    def stock_pipeline(self, comps, scheduler=None):
        from diffusers import SanaPipeline

        return SanaPipeline(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
                            transformer=comps.transformer, scheduler=scheduler or comps.scheduler)

    def pipeline_generate(self, pipe, cond: Cond, neg: Cond | None, latents, *, steps, guidance, resolution):
        kwargs = {}
        if neg is not None:
            # negative_prompt=None: SanaPipeline's default is "", which it refuses next to negative embeddings.
            kwargs = dict(negative_prompt=None, negative_prompt_embeds=neg["embeds"],
                          negative_prompt_attention_mask=neg["mask"])
        return pipe(prompt_embeds=cond["embeds"], prompt_attention_mask=cond["mask"], latents=latents,
                    num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                    # What the pipeline would tokenize itself (no negative given) matches the embeddings.
                    max_sequence_length=cond["embeds"].shape[1], complex_human_instruction=None,
                    # Binning would snap the resolution to Sana's aspect-ratio table and resize back.
                    use_resolution_binning=False, output_type="np", return_dict=False, **kwargs)[0]

    def write_lora_file(self, out: Path, denoiser, text_encoders: dict, denoiser_cfg, te_cfgs: dict) -> None:
        """``pytorch_lora_weights.safetensors`` for ``SanaPipeline.load_lora_weights``, as
        train_dreambooth_lora_sana.py saves it (the peft state dict; the loader converts it), with
        the LoraConfig as adapter metadata so the loader restores alpha (scale = alpha / r)."""
        from diffusers import SanaPipeline
        from peft.utils import get_peft_model_state_dict

        SanaPipeline.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(denoiser),
                                       transformer_lora_adapter_metadata=denoiser_cfg.to_dict(),
                                       weight_name=LORA_FILE, safe_serialization=True)


BACKBONE = SanaBackbone()

__all__ = ["BACKBONE", "SanaBackbone", "DIT_TARGETS", "SANA_SCHEDULER", "LORA_FILE", "FlowMatchTraining",
           "build_gemma_tokenizer", "train_gemma_tokenizer", "dc_autoencoder_class", "ensure_tiny", "predict_velocity"]
