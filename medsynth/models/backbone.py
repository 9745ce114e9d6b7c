"""The backbone interface: what the finetune loop, HLDF, sample grids and synthesis need from a model family.

Each family (``pixart``, later ``sd``, ``sdxl``, ``hunyuan-dit``, ``dit``) lives in its own module,
``medsynth/models/<family>.py``, and exposes one :class:`Backbone` subclass instance as
``BACKBONE``. Everything outside those modules asks :func:`get` (by name) or :func:`for_recipe`
for the backbone and calls its methods; it never names a family. docs/architecture.md draws the
design, the data flow of a training step, of HLDF and of synthesis, and how to add a family.

Family detection (:func:`family_of`): ``model.family`` when set; otherwise the ``_class_name`` of
the base's model_index.json (``PixArtAlphaPipeline`` -> ``pixart``, ...); ``model.base: tiny``
is a PixArt unless ``model.family`` says otherwise.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

# family name -> module under medsynth.models (imported on first use: torch/diffusers stay lazy).
REGISTRY: dict[str, str] = {"pixart": "pixart", "dit": "dit", "sd": "sd", "hunyuan-dit": "hunyuan_dit", "sdxl": "sdxl",
                           "sana": "sana"}
# Every name recipe.model.family accepts; the ones missing from REGISTRY are planned, not built yet.
FAMILIES = ("pixart", "sd", "sdxl", "hunyuan-dit", "dit", "sana")
# model_index.json _class_name -> family.
PIPELINE_FAMILIES: dict[str, str] = {
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "HunyuanDiTPipeline": "hunyuan-dit",
    "DiTPipeline": "dit",
    "SanaPipeline": "sana",
}
# The family of model.base 'tiny' and of finetune outputs written before adapter.json named one.
DEFAULT_FAMILY = "pixart"


# ----------------------------------------------------------------------------- conditioning


@dataclass
class Cond:
    """Conditioning for one batch: named tensors, batch-first (None = not used by this family).

    PixArt: ``embeds`` (B, L, D) T5 states and ``mask`` (B, L). Other families add their own names
    (pooled embeddings, time ids, class labels). Floating tensors follow ``to(dtype=...)``; integer
    ones (masks, labels) keep their dtype, as the models expect.
    """

    tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def _map(self, fn) -> Cond:
        return Cond({k: (None if v is None else fn(v)) for k, v in self.tensors.items()})

    def to(self, device=None, dtype=None) -> Cond:
        def move(v: torch.Tensor) -> torch.Tensor:
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            return v.to(device) if device is not None else v
        return self._map(move)

    def rows(self, idx) -> Cond:
        """The batch rows ``idx`` (a list of indices, or a slice)."""
        return self._map(lambda v: v[idx])

    def expand(self, b: int) -> Cond:
        """A batch of 1 repeated to ``b`` rows (a view, no copy)."""
        return self._map(lambda v: v.expand(b, *v.shape[1:]))

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values() if v is not None)

    @property
    def batch_size(self) -> int:
        return next(v.shape[0] for v in self.tensors.values() if v is not None)

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Concatenate along the batch (CFG's [negative, positive] batch, cache chunks)."""
        keys = conds[0].tensors.keys()
        return Cond({k: (None if conds[0].tensors[k] is None else torch.cat([c.tensors[k] for c in conds]))
                     for k in keys})


# ----------------------------------------------------------------------------- the interface


class Backbone:
    """One model family. Subclasses set the attributes and implement the methods marked so.

    Attributes
    - ``name``: the family name (``model.family``).
    - ``label``: how messages name it ("PixArt-alpha").
    - ``parts``: the diffusers sub-folders a full load needs (also what ``check_base`` checks).
    - ``denoiser_part``: which part is the denoiser (``transformer``, ``unet``).
    - ``text_encoder_parts``: the text encoders that may carry LoRA (in order); empty for
      class-conditional families.
    - ``layout``: the expected diffusers layout, for error messages.
    - ``lora_presets``: role (``denoiser`` / a text-encoder part) -> preset name -> LoRA targets.
    """

    name: str = ""
    label: str = ""
    # A Hub id of the family, for messages on how to get weights ("" for families trained from scratch).
    hub_example: str = ""
    parts: tuple[str, ...] = ()
    denoiser_part: str = "transformer"
    text_encoder_parts: tuple[str, ...] = ()
    layout: str = ""
    lora_presets: dict[str, dict[str, list[str]]] = {}
    # Conditioned on class labels (encode's ``labels``) rather than on the prompts.
    class_conditional: bool = False
    # EMA decay of a full fine-tune whose EMA weights become the final model (None: no EMA).
    ema_decay: float | None = None

    # ---- loading
    # part -> "library.Class" whose from_pretrained loads it, for every part but the VAE, the
    # tokenizers and the scheduler (load_part handles those alike for every family).
    part_classes: dict[str, str] = {}
    # The scheduler class used when scheduler_config.json names one diffusers does not have.
    scheduler_class: str = "DDPMScheduler"

    def load_part(self, part: str, base: str, kw: dict, dtype):
        """Load one part with ``from_pretrained(base, **kw)`` (``kw`` holds subfolder, revision,
        local_files_only) in ``dtype``.

        - ``vae``: the class vae/config.json names (``AutoencoderKL``, or medsynth's TAEF2 for a
          tiny base);
        - ``tokenizer*``: AutoTokenizer, else the class model_index.json names (a T5 folder with
          only spiece.model);
        - ``scheduler``: the class its config names, built from the full config, so the DDPM and
          DPM-Solver++ made from it see every setting (steps_offset, clip_sample, ...);
        - every other part: ``part_classes[part]``, then :meth:`prepare_part`.
        """
        from .loading import _tokenizer_from, _vae_class, diffusers_dtype_kw

        if part == "vae":
            return _vae_class(base, kw).from_pretrained(base, **diffusers_dtype_kw(dtype), **kw)
        if part.startswith("tokenizer"):
            return _tokenizer_from(base, kw)
        if part == "scheduler":
            import diffusers

            default = getattr(diffusers, self.scheduler_class)
            cfg = default.load_config(base, **kw)
            return getattr(diffusers, str(cfg.get("_class_name")), default).from_config(cfg)
        lib = self.part_classes[part].partition(".")[0]
        dtype_kw = diffusers_dtype_kw(dtype) if lib == "diffusers" else {"dtype": dtype}  # transformers >= 4.56
        return self.prepare_part(part, self._part_class(part).from_pretrained(base, **dtype_kw, **kw))

    def _part_class(self, part: str):
        lib, _, name = self.part_classes[part].rpartition(".")
        return getattr(importlib.import_module(lib), name)

    def prepare_part(self, part: str, model):
        """What the family does to a freshly loaded model part (and to a fully fine-tuned denoiser)
        before use; returns it. Default: nothing."""
        return model

    def build_tiny(self, recipe) -> Path:
        """Build (once, cached) the family's tiny base for ``model.base: tiny`` and return its
        directory in diffusers layout; it is then loaded through :meth:`load_part` like any base."""
        raise UserError(f"model.base 'tiny' is not available for model.family '{self.name}'; "
                        "give a Hugging Face id or a local diffusers directory")

    def tiny_dir(self, recipe) -> Path:
        """Where :meth:`build_tiny` puts (or would put) the tiny base, without building it."""
        from .tiny import base_dir

        return base_dir(recipe)

    def denoiser_class(self):
        """The diffusers class of the denoiser (``from_config`` for the dry run, full fine-tunes)."""
        return self._part_class(self.denoiser_part)

    def check_recipe(self, recipe, base: str) -> None:
        """Warn about recipe settings that do not suit ``base`` (the resolved id or directory).

        Called where parts are loaded with the recipe at hand (``loading.load_components`` and the
        caption stage's ``loading.load_tokenizer``), not per step. Default: nothing to check."""

    # ---- captions
    def caption_tokenizer_base(self, recipe) -> str:
        """The id or directory whose ``tokenizer/`` counts caption tokens in the caption stage.

        The tiny base is built for it (its tokenizer lives there); a family without a tokenizer
        (class labels) counts with the tiny T5 tokenizer, which needs no model: its captions are
        kept for provenance and comparison only, training never reads them."""
        from .loading import resolve_base
        from .tiny import tokenizer_dir

        if "tokenizer" not in self.parts:
            return str(tokenizer_dir(recipe).resolve())
        return resolve_base(recipe)

    def caption_token_limit(self, recipe, tokenizer) -> int:
        """The most tokens a caption may have: ``model.max_text_tokens``, capped by the text
        encoder's own limit (the tokenizer's ``model_max_length``: CLIP's 77), beyond which the
        encoder would cut the caption silently."""
        limit = int(recipe.model.max_text_tokens)
        own = getattr(tokenizer, "model_max_length", None)
        # Tokenizers without a limit report a huge sentinel (transformers' VERY_LARGE_INTEGER).
        if isinstance(own, int) and 0 < own < 100_000:
            return min(limit, own)
        return limit

    def load_full_denoiser(self, path: Path, dtype):
        """A fully fine-tuned denoiser saved with ``save_pretrained`` in ``path``."""
        from .loading import diffusers_dtype_kw

        return self.prepare_part(self.denoiser_part,
                                 self.denoiser_class().from_pretrained(str(path), **diffusers_dtype_kw(dtype)))

    # ---- parts of loaded components
    def denoiser(self, comps):
        return getattr(comps, self.denoiser_part)

    def text_encoders(self, comps) -> dict[str, Any]:
        """part name -> text encoder module, for every text encoder that may carry LoRA."""
        return {p: getattr(comps, p) for p in self.text_encoder_parts}

    def lora_targets(self, role: str, preset: str) -> list[str]:
        """LoRA target module names for ``role`` ('denoiser' or a text-encoder part) and a preset name."""
        try:
            return list(self.lora_presets[role][preset])
        except KeyError:
            choices = sorted(self.lora_presets.get(role, {}))
            raise UserError(f"LoRA preset {preset!r} for the {role} of model.family '{self.name}' does not exist; "
                            f"choose one of {choices}") from None

    # ---- conditioning
    def encode(self, comps, prompts: Sequence[str], max_length: int, device, labels=None) -> Cond:
        """Conditioning for ``prompts`` (gradients flow when the caller enables them: a text encoder
        may carry LoRA being trained). ``labels``: the class index per prompt (None for an empty /
        dropped prompt), used by class-conditional families, ignored by text-conditioned ones.
        Implemented by the family."""
        raise NotImplementedError

    # ---- prediction
    def predict(self, denoiser, latents: torch.Tensor, t, cond: Cond,
                pixel_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The denoiser's output with as many channels as ``latents`` (epsilon, v or x0, as the
        scheduler's ``prediction_type`` says). Implemented by the family."""
        raise NotImplementedError

    def latent_channels(self, comps) -> int:
        from ..sampling import unwrap

        return unwrap(self.denoiser(comps)).config.in_channels

    def vae_scale(self, vae) -> int:
        """Pixels per latent pixel."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    # ---- schedulers
    def training_scheduler(self, scheduler_config):
        """The noise schedule training adds noise with (DDPM from the base's scheduler config)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler_config)

    def sampling_scheduler(self, scheduler_config):
        """DPM-Solver++ (2nd order multistep, deterministic) from the base's scheduler config."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")

    # ---- stock pipeline (synthesis, parity tests, load_finetuned)
    def stock_pipeline(self, comps, scheduler=None):
        """The stock diffusers pipeline built from ``comps`` (``scheduler`` replaces the loaded one)."""
        raise NotImplementedError

    def pipeline_generate(self, pipe, cond: Cond, neg: Cond | None, latents: torch.Tensor, *, steps: int,
                          guidance: float, resolution: int):
        """Float images (B, H, W, 3) in [0, 1] as numpy from the stock pipeline, given precomputed
        conditioning and initial latents."""
        raise NotImplementedError

    # ---- outputs
    def write_lora_file(self, out: Path, denoiser, text_encoders: dict, denoiser_cfg, te_cfgs: dict) -> None:
        """Write, into a finetune's ``final/`` folder ``out``, the file the family's own diffusers LoRA
        loader takes (``pipe.load_lora_weights``), next to the PEFT folders. ``text_encoders``: the
        trained ones (part -> module), ``te_cfgs`` their LoraConfigs. Default: nothing, for families
        without such a loader."""


# ----------------------------------------------------------------------------- registry


def get(name: str) -> Backbone:
    """The backbone of family ``name``; a known but not yet built family is a UserError."""
    if name not in REGISTRY:
        if name in FAMILIES:
            raise UserError(f"model.family '{name}' is not available in this version; available: "
                            f"{', '.join(sorted(REGISTRY))}")
        raise UserError(f"model.family {name!r} is not a known family; choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__package__}.{REGISTRY[name]}").BACKBONE


def index_class_name(base: str, revision: str | None = None, local_files_only: bool = False) -> str | None:
    """``_class_name`` of the base's model_index.json (local dir or Hub id), or None when unreadable."""
    from .loading import _is_local

    try:
        if _is_local(base):
            path = Path(base) / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base, "model_index.json", revision=revision, local_files_only=local_files_only))
        name = json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except Exception:  # missing, unreadable, not downloadable: check_base reports that better
        return None
    return name if isinstance(name, str) else None


def family_of(recipe, *, strict: bool = True) -> str | None:
    """The family name for ``recipe``: ``model.family``, else from model_index.json's ``_class_name``.

    With ``strict`` false, an unreadable model_index.json gives None (the caller then reports
    the missing files); an unknown class name is always a UserError.
    """
    explicit = getattr(recipe.model, "family", None)
    if explicit:
        return explicit
    base = (recipe.model.base or "").strip()
    if base == "tiny":
        return DEFAULT_FAMILY
    from .loading import _is_local, is_offline, resolve_base

    resolved = resolve_base(recipe)
    name = index_class_name(resolved, recipe.model.revision, is_offline() or _is_local(resolved))
    if name is None:
        if not strict:
            return None
        raise UserError(f"model.base: cannot read model_index.json of {resolved} to tell the model family; "
                        f"set model.family (one of {', '.join(FAMILIES)}) or fix model.base")
    family = PIPELINE_FAMILIES.get(name)
    if family is None:
        raise UserError(f"model.base: {resolved} is a {name} (model_index.json _class_name), which medsynth does not "
                        f"support; supported pipelines: {', '.join(PIPELINE_FAMILIES)}. Use another model.base, or set "
                        f"model.family (one of {', '.join(FAMILIES)}) if the pipeline is one of those families")
    return family


def for_recipe(recipe) -> Backbone:
    """The backbone ``recipe`` uses (see :func:`family_of`)."""
    return get(family_of(recipe))


__all__ = ["Backbone", "Cond", "REGISTRY", "FAMILIES", "PIPELINE_FAMILIES", "DEFAULT_FAMILY", "get", "family_of",
           "for_recipe", "index_class_name"]
