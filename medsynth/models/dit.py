"""DiT (Fast-DiT style) behind the backbone interface: a class-conditional ``DiTTransformer2DModel``
trained from scratch on the data set's class labels; no text encoder, no LoRA.

Conditioning. The labels are the class indices of classes.json. diffusers' ``LabelEmbedding``
(one per transformer block, inside ``AdaLayerNormZero``) holds ``num_embeds_ada_norm + 1`` rows
when its dropout probability is > 0 (always 0.1 as ``DiTTransformer2DModel`` builds it): row K is
the null class of classifier-free guidance. The model is built with ``num_embeds_ada_norm`` = K
(number of classes), so the null label is K. The embedding's own label dropout draws from the
global torch RNG in train mode; medsynth switches it off (:func:`no_label_dropout`) and drops
labels in the finetune loop instead, with probability ``finetune.label_dropout`` (null = the
``finetune.caption_dropout`` value) from the trainer's seeded generator, so a resumed run draws the
same drops as an uninterrupted one.

Prompts are ignored: :meth:`DiTBackbone.encode` conditions on ``labels`` only (None in that list
= the null label, which is also the CFG negative). The caption stage still runs when the recipe
asks for it; its captions only end up as the ``prompt`` metadata of the synthetic samples.

Output: DiT predicts 2*C channels (learned sigma); like DiTPipeline and PixArt we use the first C
and train them with the MSE against the scheduler's target (diffusers has no learned-sigma VLB
loss; the variance half gets no gradient).

Sampling: ``DiTPipeline`` hard-codes the null class 1000 (ImageNet), so it cannot guide a K-class
model; synthesis and sample grids use medsynth's DPM-Solver++ loop (``sampling.denoise``), which
tests/test_family_dit.py checks against ``DiTPipeline`` on a 1000-class tiny DiT.

EMA: the final model is the exponential moving average of the weights (:data:`EMA_DECAY`, with
diffusers ``EMAModel``'s warm-up ``min(decay, (1 + n) / (10 + n))`` so short runs average their
recent steps rather than stay near the random initialisation); ``finetune.ema_decay`` overrides the
decay (the warm-up still caps it at (1 + n) / (10 + n), so decays >= 0.5 agree for the first 8 steps).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from .backbone import Backbone, Cond

# Fast-DiT's EMA decay: the default of finetune.ema_decay (null) for this family.
EMA_DECAY = 0.9999
TINY_DIT_FORMAT = 1


def dit_s8_config(num_classes: int, latent_channels: int = 4, sample_size: int = 32) -> dict:
    """DiT-S/8 (Peebles & Xie): hidden 384 (6 heads x 64), depth 12, patch 8, learned sigma."""
    return dict(num_attention_heads=6, attention_head_dim=64, in_channels=latent_channels,
                out_channels=2 * latent_channels, num_layers=12, sample_size=sample_size, patch_size=8,
                num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero")


def no_label_dropout(model):
    """Switch off the label dropout inside every ``LabelEmbedding`` (the loop drops labels itself)."""
    from diffusers.models.embeddings import LabelEmbedding

    from ..sampling import unwrap

    for m in unwrap(model).modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return model


def null_label(model) -> int:
    from ..sampling import unwrap

    return int(unwrap(model).config.num_embeds_ada_norm)


class DiTBackbone(Backbone):
    name = "dit"
    label = "DiT"
    parts = ("transformer", "vae", "scheduler")
    denoiser_part = "transformer"
    text_encoder_parts = ()
    layout = "model_index.json, transformer/, vae/, scheduler/"
    lora_presets = {}
    class_conditional = True
    ema_decay = EMA_DECAY
    part_classes = {"transformer": "diffusers.DiTTransformer2DModel"}
    scheduler_class = "DDPMScheduler"

    def prepare_part(self, part: str, model):
        return no_label_dropout(model) if part == self.denoiser_part else model

    def build_tiny(self, recipe) -> Path:
        return ensure_tiny_dit(recipe)

    def tiny_dir(self, recipe) -> Path:
        return tiny_dir(recipe)

    def lora_targets(self, role: str, preset: str) -> list[str]:
        raise UserError("finetune.adapter 'lora' does not apply to model.family 'dit': the DiT is trained from scratch "
                        "on the class labels; set finetune.adapter: full (and finetune.lora.text_encoder: false)")

    def encode(self, comps, prompts: Sequence[str], max_length: int, device, labels=None) -> Cond:
        if labels is None:
            raise ValueError("model.family 'dit' is class-conditional: encode() needs labels (None = null label)")
        null = null_label(self.denoiser(comps))
        ids = [null if lab is None else int(lab) for lab in labels]
        bad = [i for i in ids if not 0 <= i <= null]
        if bad:
            raise UserError(f"class label {bad[0]} is outside the DiT's {null} classes (model.base was built for "
                            f"another data set); rebuild the base for this data set's classes.json")
        return Cond({"labels": torch.tensor(ids, dtype=torch.long, device=device)})

    def predict(self, denoiser, latents, t, cond: Cond, pixel_size=None):
        b = latents.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=latents.device)
        t = t.to(latents.device)
        if t.ndim == 0:
            t = t[None]
        if t.shape[0] != b:
            t = t.expand(b)
        out = denoiser(latents, timestep=t, class_labels=cond["labels"].to(latents.device), return_dict=False)[0]
        c = latents.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out

    def stock_pipeline(self, comps, scheduler=None):
        from diffusers import DiTPipeline

        return DiTPipeline(transformer=comps.transformer, vae=comps.vae, scheduler=scheduler or comps.scheduler)

    def pipeline_generate(self, pipe, cond: Cond, neg: Cond | None, latents, *, steps, guidance, resolution):
        # DiTPipeline's CFG uses the null class 1000 and takes no latents: medsynth's sampler instead.
        from .. import sampling

        with torch.no_grad():
            x = latents * pipe.scheduler.init_noise_sigma
            x = sampling.denoise(self, pipe.transformer, pipe.scheduler.config, x, cond, neg, steps=steps,
                                 guidance=guidance)
            img = sampling.decode(pipe.vae, x).float()
        return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- tiny base


def tiny_inputs(recipe) -> dict:
    from ..data import read_classes
    from . import tiny

    inputs = tiny.base_inputs(recipe)
    for k in ("vocab_size", "max_text_tokens", "text_layers", "text_dim"):  # no text encoder here
        inputs.pop(k, None)
        inputs["tiny"].pop(k, None)
    return {**inputs, "family": "dit", "dit_format": TINY_DIT_FORMAT,
            "classes": [c["name"] for c in read_classes(recipe.workdir_path)]}


def tiny_dir(recipe) -> Path:
    from ..workspace import sha256_json

    return recipe.workdir_path / "tiny-base" / f"dit-{sha256_json(tiny_inputs(recipe))[:16]}"


def tiny_transformer_config(recipe, num_classes: int) -> dict:
    from . import tiny

    t = recipe.model.tiny
    lat = tiny.latent_channels(t)
    return dict(num_attention_heads=t.heads, attention_head_dim=t.head_dim, in_channels=lat, out_channels=2 * lat,
                num_layers=t.layers, sample_size=recipe.model.resolution // tiny.vae_factor(t),
                patch_size=tiny.dit_patch_size(t), num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero")


def ensure_tiny_dit(recipe) -> Path:
    """The tiny DiT base for this recipe and data set, built once (cached and locked like tiny.py's)."""
    from .. import console
    from ..workspace import atomic_write_json
    from . import tiny

    final = tiny_dir(recipe)
    if (final / tiny.INFO_FILE).is_file():
        return final
    tiny._check_geometry(recipe)
    console.info(f"tiny DiT base: building {final} (once per data set and settings)")
    with tiny._building(final) as tmp:
        atomic_write_json(tmp / tiny.INFO_FILE, build_tiny_dit(recipe, tmp))
    return final


def save_base(out: Path, transformer, vae, class_names: Sequence[str], prediction_type: str = "epsilon") -> Path:
    """Save a DiT base (e.g. ``DiTTransformer2DModel(**dit_s8_config(K, ...))`` untrained, with a
    pretrained VAE) as a DiTPipeline directory for ``model.base``: DDPM scheduler with DiT's
    linear betas (1e-4 .. 0.02, 1000 steps), ``id2label`` in model_index.json as
    facebook/DiT-XL-2-256 ships it. ``class_names`` in classes.json order."""
    from diffusers import DDPMScheduler, DiTPipeline

    from ..workspace import atomic_write_json

    scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                              prediction_type=prediction_type, clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    index = json.loads((Path(out) / "model_index.json").read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(class_names)}
    atomic_write_json(Path(out) / "model_index.json", index)
    return Path(out)


def build_tiny_dit(recipe, out: Path) -> dict:
    """A tiny DiT + the tiny base's autoencoder (TAEF2 or a fitted KL VAE) + DDPM linear betas,
    saved with ``DiTPipeline.save_pretrained``; ``id2label`` (class names) added to model_index.json."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from ..data import read_classes, read_manifest
    from . import tiny

    t = recipe.model.tiny
    classes = read_classes(recipe.workdir_path)
    torch.manual_seed(recipe.seed)
    transformer = DiTTransformer2DModel(**tiny_transformer_config(recipe, len(classes)))
    # DiT's training betas (linear 1e-4 .. 0.02, 1000 steps); the prediction type as the tiny base's.
    rows = read_manifest(recipe.workdir_path, "train")
    images = tiny.load_images([r.path for r in rows], recipe.model.resolution)
    if t.autoencoder == "taef2":
        from .taef2 import AutoencoderTAEF2

        vae = AutoencoderTAEF2.from_shipped(sample_size=recipe.model.resolution)
        stats = {"autoencoder": "taef2", **tiny._centre_and_scale_taef2(vae, images)}
    else:
        torch.manual_seed(recipe.seed + 2)
        vae = AutoencoderKL(**tiny.vae_config(recipe))
        crop = t.vae_fit_crop or recipe.model.resolution
        stats = {"autoencoder": "fitted", **tiny.fit_vae(vae, images, steps=t.vae_fit_steps, batch=t.vae_fit_batch,
                                                          crop=min(crop, recipe.model.resolution), seed=recipe.seed + 3)}
    save_base(out, transformer, vae, [c["name"] for c in classes], t.prediction_type)
    return {"family": "dit", "format": TINY_DIT_FORMAT, "classes": [c["name"] for c in classes],
            "parameters": {"transformer": sum(p.numel() for p in transformer.parameters()),
                           "vae": sum(p.numel() for p in vae.parameters())}, "vae": stats}


BACKBONE = DiTBackbone()

__all__ = ["BACKBONE", "DiTBackbone", "EMA_DECAY", "dit_s8_config", "no_label_dropout", "null_label",
           "ensure_tiny_dit", "build_tiny_dit", "save_base", "tiny_transformer_config"]
