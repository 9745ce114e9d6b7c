"""Loading the base text-to-image model, the same way for every kind of ``model.base``.

``model.base`` is one of
- a Hugging Face id (``PixArt-alpha/PixArt-XL-2-512x512``): downloaded into the Hugging Face cache,
  or, with ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``, taken from that cache only;
- a local directory in diffusers layout (model_index.json, transformer/, text_encoder/, tokenizer/,
  vae/, scheduler/), e.g. made with ``hf download ... --local-dir DIR``;
- ``tiny``: built in code into the workspace by :mod:`medsynth.models.tiny`, then loaded like a
  local directory.

Every component goes through ``from_pretrained(base, subfolder=..., revision=model.revision,
local_files_only=...)``, so the tiny base exercises the exact code path of a real model.
:func:`check_base` runs before any work and turns "weights not there" into a :class:`UserError`
naming the id or path, the expected layout and how to get the weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import UserError

PARTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
LAYOUT = "model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/"
DEFAULT_BASE = "PixArt-alpha/PixArt-XL-2-512x512"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}

# What a sub-folder must hold to be loadable: (config file, weight-file patterns); None = no weights.
_NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    "transformer": (("config.json",), ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "unet": (("config.json",), ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "text_encoder_2": (("config.json",), ("model*.safetensors", "pytorch_model*.bin")),
    "tokenizer_2": (("tokenizer.json", "spiece.model", "vocab.json", "tokenizer_config.json"), None),
    "vae": (("config.json",), ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "text_encoder": (("config.json",), ("model*.safetensors", "pytorch_model*.bin")),
    # vocab.txt: a BERT WordPiece tokenizer without tokenizer.json (Hunyuan-DiT's CLIP-like encoder).
    # vocab.json (+ merges.txt): a CLIP BPE tokenizer without tokenizer.json (the SD 1.x / SDXL hub folders).
    "tokenizer": (("tokenizer.json", "spiece.model", "vocab.txt", "vocab.json"), None),
    "scheduler": (("scheduler_config.json",), None),
}


# ----------------------------------------------------------------------------- small resolvers


def resolve_device(spec: str):
    """'auto' -> cuda if available, else mps if available, else cpu; anything else as torch.device."""
    import torch

    spec = (spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"device {spec!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} was asked for but this torch build sees no CUDA GPU; use --set model.device=cpu (or 'auto')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible; pick an index below that")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device {spec!r} was asked for but MPS is not available here; use 'cpu' or 'auto'")
    return dev


def diffusers_dtype_kw(dtype) -> dict:
    """The dtype keyword of diffusers' ``from_pretrained``: ``dtype`` where diffusers has it
    (0.42 deprecates ``torch_dtype``, 1.0 removes it), ``torch_dtype`` in older versions."""
    import diffusers
    from diffusers.utils import deprecation_utils

    major = int(diffusers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 1 or hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def resolve_dtype(name: str):
    """'bf16' | 'fp16' | 'fp32' -> torch dtype."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if isinstance(name, torch.dtype):
        return name
    try:
        return table[name]
    except KeyError:
        raise UserError(f"dtype {name!r} is not one of bf16, fp16, fp32") from None


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_local(base: str) -> bool:
    """A local directory (existing or clearly meant as a path) rather than a Hugging Face id."""
    p = Path(base).expanduser()
    return p.exists() or base.startswith(("/", ".", "~")) or "\\" in base or not _HF_ID.match(base)


def resolve_base(recipe) -> str:
    """The id or local directory to load from; ``tiny`` is built (once, cached) and its directory returned."""
    base = (recipe.model.base or "").strip()
    if not base:
        raise UserError(f"model.base is empty; give a Hugging Face id (e.g. {DEFAULT_BASE}), a local diffusers directory, or 'tiny'")
    if base == "tiny":
        from .backbone import for_recipe

        return str(for_recipe(recipe).build_tiny(recipe).resolve())
    if _is_local(base):
        return str(Path(base).expanduser().resolve())
    return base


# ----------------------------------------------------------------------------- checking


def _how_to_get(base: str, bb=None) -> str:
    """How to get a base's weights; a local directory gets its family's usual Hub id as the example."""
    if _is_local(base) and bb is not None and not bb.hub_example:  # trained from scratch: no Hub weights
        return (f"A {bb.label} base is written by medsynth.models.{bb.__module__.rsplit('.', 1)[-1]}.save_base "
                "(docs/paper.md shows the command); or use --set model.base=tiny for the small model built from "
                "your data.")
    hub_id = base if not _is_local(base) else (getattr(bb, "hub_example", "") or DEFAULT_BASE)
    return (f"Get the weights on a machine with internet: `hf download {hub_id} --local-dir DIR` "
            f"(older huggingface_hub: `huggingface-cli download {hub_id} --local-dir DIR`), copy DIR here "
            "and pass --set model.base=DIR; "
            + ("or let medsynth download it by unsetting HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE; " if is_offline() else "")
            + "or use --set model.base=tiny for the small offline model built from your data.")


def missing_parts(root: Path, parts=PARTS) -> list[str]:
    """What a diffusers directory lacks for ``parts`` ('transformer/config.json', ...); empty = complete."""
    missing = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    for part in parts:
        cfgs, weights = _NEEDS[part]
        sub = root / part
        if not sub.is_dir():
            missing.append(f"{part}/")
            continue
        if not any((sub / c).is_file() for c in cfgs):
            missing.append(f"{part}/{' or '.join(cfgs)}")
        if weights and not any(any(sub.glob(w)) for w in weights):
            missing.append(f"{part}/{weights[0]}")
    return missing


def _layout_error(what: str, missing: list[str], base: str, bb=None) -> UserError:
    label, layout = (bb.label, bb.layout) if bb is not None else ("PixArt-alpha", LAYOUT)
    return UserError(
        f"model.base: {what} cannot be loaded: missing {', '.join(missing)}. "
        f"A {label} base in diffusers layout holds {layout} (each with its config and weights). "
        + _how_to_get(base, bb))


def _backbone_or_none(recipe):
    """The recipe's backbone, or None when model_index.json cannot be read (check_base says what is missing)."""
    from .backbone import family_of, get

    family = family_of(recipe, strict=False)
    return None if family is None else get(family)


def check_base(recipe, parts=None) -> None:
    """Fail fast, before any work, when ``model.base`` (the listed parts; default: all its family's) cannot be loaded."""
    base = resolve_base(recipe)
    bb = _backbone_or_none(recipe)
    parts = tuple(parts if parts is not None else (bb.parts if bb is not None else PARTS))
    if recipe.model.base.strip() == "tiny" or _is_local(base):
        root = Path(base)
        if not root.is_dir():
            raise UserError(f"model.base: {root} is not a directory. Give a local diffusers directory "
                            f"({bb.layout if bb is not None else LAYOUT}), "
                            "a Hugging Face id, or 'tiny'. " + _how_to_get(recipe.model.base, bb))
        missing = missing_parts(root, parts)
        if missing:
            raise _layout_error(str(root), missing, recipe.model.base, bb)
        return
    _check_hub(base, recipe.model.revision, parts, bb)


def _check_hub(repo_id: str, revision: str | None, parts, bb=None) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    rev = f" (revision {revision})" if revision else ""
    layout = bb.layout if bb is not None else LAYOUT
    if is_offline():
        # huggingface_hub answers a cache miss in offline mode with LocalEntryNotFoundError
        # ("Cannot find the requested files in the disk cache and outgoing traffic has been disabled").
        try:
            snap = snapshot_download(repo_id, revision=revision, local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            raise UserError(
                f"model.base: '{repo_id}'{rev} is not in the Hugging Face cache and downloads are disabled "
                f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set); there is no local directory of that name either. "
                f"It needs {layout}. " + _how_to_get(repo_id)) from None
        missing = missing_parts(Path(snap), parts)
        if missing:
            raise _layout_error(f"'{repo_id}'{rev} (cached at {snap})", missing, repo_id, bb)
        return
    try:
        from huggingface_hub import HfApi

        files = set(HfApi().list_repo_files(repo_id, revision=revision))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        kind = "is gated: accept its licence on huggingface.co and log in (`hf auth login`)" if isinstance(e, GatedRepoError) \
            else "does not exist on the Hugging Face Hub (or is private: log in with `hf auth login`)"
        raise UserError(f"model.base: '{repo_id}' {kind}. Check the id, or give a local diffusers directory ({layout}) or 'tiny'.") from None
    except RevisionNotFoundError:
        raise UserError(f"model.revision: '{revision}' is not a branch, tag or commit of '{repo_id}'; fix or remove model.revision") from None
    except Exception as e:  # HfHubHTTPError, OSError, and httpx transport errors (ConnectError) alike
        raise UserError(f"model.base: cannot reach the Hugging Face Hub to look up '{repo_id}' ({e.__class__.__name__}: {str(e)[:200]}). "
                        "If this machine is offline, set HF_HUB_OFFLINE=1 to use the local cache, or: " + _how_to_get(repo_id)) from None
    missing = []
    if "model_index.json" not in files:
        missing.append("model_index.json")
    for part in parts:
        if not any(f.startswith(part + "/") for f in files):
            missing.append(f"{part}/")
    if missing:
        raise _layout_error(f"'{repo_id}'{rev} on the Hub", missing, repo_id, bb)


# ----------------------------------------------------------------------------- loading


class Components:
    """Loaded parts of the base, by diffusers sub-folder name (``transformer``, ``text_encoder``, ...);
    a part that was not asked for reads as None. ``base`` = resolved id or dir, ``family`` = backbone name."""

    def __init__(self, base: str = "", family: str = "", **parts: Any):
        self.base = base
        self.family = family
        for k, v in parts.items():
            setattr(self, k, v)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return None

    def replace(self, **parts: Any) -> Components:
        """A shallow copy with some parts replaced (e.g. the unwrapped training modules)."""
        out = Components()
        vars(out).update(vars(self))
        vars(out).update(parts)
        return out


def _load_kwargs(recipe, base: str, subfolder: str) -> dict:
    return {"subfolder": subfolder, "revision": recipe.model.revision,
            "local_files_only": is_offline() or _is_local(base)}


def _wrap(base: str, part: str, e: Exception, bb=None) -> UserError:
    label, layout = (bb.label, bb.layout) if bb is not None else ("PixArt-alpha", LAYOUT)
    return UserError(f"model.base: loading {part}/ of {base} failed ({e.__class__.__name__}: {str(e)[:400]}). "
                     f"The directory or repo must hold a {label} pipeline in diffusers layout ({layout}). "
                     + _how_to_get(base, bb))


def _vae_class(base: str, kw: dict):
    """The autoencoder class ``vae/config.json`` names: ``AutoencoderKL`` (every real base) or medsynth's TAEF2.

    The tiny base with ``model.tiny.autoencoder: taef2`` saves ``AutoencoderTAEF2`` there; loading it as
    ``AutoencoderKL`` would fail on every weight name. Any other or unreadable name falls back to
    ``AutoencoderKL``, whose ``from_pretrained`` then reports what is wrong with the folder.
    """
    from diffusers import AutoencoderKL

    try:
        name = AutoencoderKL.load_config(base, **kw).get("_class_name")
    except (OSError, ValueError):
        return AutoencoderKL
    if name == "AutoencoderTAEF2":
        from .taef2 import AutoencoderTAEF2

        return AutoencoderTAEF2
    return AutoencoderKL


def load_tokenizer(recipe):
    """The tokenizer that counts caption tokens for the recipe's family (``Backbone.caption_tokenizer_base``):
    the base's ``tokenizer/`` (T5 for PixArt, CLIP for SD / SDXL, BERT for Hunyuan-DiT). For ``tiny``
    it is loaded from the tiny base on disk (PixArt's is built alone, with no VAE fit)."""
    bb = _backbone_or_none(recipe)
    tiny = recipe.model.base.strip() == "tiny"
    if bb is None:  # model_index.json unreadable: check_base names what is missing
        check_base(recipe, parts=("tokenizer",))
        base = resolve_base(recipe)
    else:
        if not tiny and "tokenizer" in bb.parts:
            check_base(recipe, parts=("tokenizer",))
        base = bb.caption_tokenizer_base(recipe)
        bb.check_recipe(recipe, base)
    try:
        tok = _tokenizer_from(base, _load_kwargs(recipe, base, "tokenizer"))
    except (OSError, ValueError) as e:
        raise _wrap(base, "tokenizer", e) from None
    return tok


def _index_class(base: str, kw: dict, part: str) -> str | None:
    """The class model_index.json names for ``part`` (e.g. 'T5Tokenizer'), or None when unknown."""
    try:
        if _is_local(base):
            path = Path(base) / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base, "model_index.json", revision=kw.get("revision"),
                                        local_files_only=kw.get("local_files_only", False)))
        entry = json.loads(path.read_text(encoding="utf-8")).get(part)
    except Exception:  # no index, unreadable, not downloadable: AutoTokenizer's own error is the better one
        return None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None


def _tokenizer_from(base: str, kw: dict):
    """AutoTokenizer, else the class model_index.json names (as DiffusionPipeline.from_pretrained does).

    A tokenizer/ folder holding only T5's ``spiece.model`` (no tokenizer_config.json) gives
    AutoTokenizer no class to build; the pipeline's model_index.json says 'T5Tokenizer'. Building
    that tokenizer from spiece.model alone needs the protobuf package (transformers 5 reads the
    sentencepiece model proto with it).
    """
    import importlib.util

    import transformers
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, **kw)
    except (OSError, ValueError) as first:
        name = _index_class(base, kw, "tokenizer")
        klass = getattr(transformers, name, None) if name else None
        if klass is None or klass is AutoTokenizer:
            raise first
        try:
            return klass.from_pretrained(base, **kw)
        except (OSError, ValueError, ImportError) as e:
            if importlib.util.find_spec("google.protobuf") is None:
                raise UserError(f"model.base: {base}: the tokenizer/ folder has no tokenizer_config.json or "
                                f"tokenizer.json, and building a {name} from its spiece.model needs the protobuf "
                                "package, which is not installed; `pip install protobuf` (or add the tokenizer's "
                                "tokenizer_config.json / tokenizer.json to the folder)") from None
            raise e from None


class StoredWeights:
    """Tensors of one part as its safetensors files store them, read one at a time (memory-mapped).

    For merging a LoRA against the unrounded base weights when the part was loaded in bf16 / fp16:
    reading each merged layer's weight from the files costs one layer's memory, where loading the
    whole part a second time in float32 would cost ~19 GB for T5-XXL."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                self._where.update(dict.fromkeys(h.keys(), f))

    def __len__(self) -> int:
        return len(self._where)

    def get(self, key: str):
        """The stored tensor ``key`` (its stored dtype), or None when the files do not hold it."""
        from safetensors import safe_open

        f = self._where.get(key)
        if f is None:
            return None
        with safe_open(str(f), framework="pt", device="cpu") as h:
            return h.get_tensor(key)


def stored_weights(base: str, part: str, revision: str | None = None) -> StoredWeights | None:
    """The safetensors files of ``part`` of ``base`` (a local diffusers directory, or a Hub id whose
    files ``from_pretrained`` already put in the local cache); None when there are none (e.g. only
    ``.bin`` files, or nothing cached): the caller then merges against the loaded weights."""
    root = Path(base).expanduser()
    if not _is_local(base):
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(base, revision=revision, allow_patterns=[f"{part}/*"], local_files_only=True))
        except Exception:  # not cached / not a repo: no stored weights to read
            return None
    files = sorted((root / part).glob("*.safetensors"))
    # A variant (diffusion_pytorch_model.fp16.safetensors) beside the full file holds rounded copies.
    full = [f for f in files if f.name.count(".") == 1 or "-of-" in f.name]
    return StoredWeights(full) if full else None


def load_components(recipe, parts=None, device=None, dtype=None) -> Components:
    """Load the asked-for parts (default: every part of the recipe's family) with ``from_pretrained``;
    models go to ``device`` in ``dtype``, in eval mode. The family's backbone picks each part's class.

    ``device``/``dtype`` default to ``model.device``/``model.dtype``; both accept strings too.
    """
    import torch

    from .backbone import family_of, get

    device = resolve_device(recipe.model.device) if device is None else (
        device if isinstance(device, torch.device) else resolve_device(str(device)))
    dtype = resolve_dtype(recipe.model.dtype if dtype is None else dtype)
    base = resolve_base(recipe)
    if parts is not None and any(p not in _NEEDS for p in parts):
        raise ValueError(f"unknown part(s) {[p for p in parts if p not in _NEEDS]}; choose from {tuple(_NEEDS)}")
    check_base(recipe, parts=parts)
    bb = get(family_of(recipe))
    bb.check_recipe(recipe, base)
    parts = tuple(bb.parts if parts is None else parts)
    unknown = [p for p in parts if p not in bb.parts]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {bb.parts}")

    out = Components(base=base, family=bb.name)
    for part in parts:
        kw = _load_kwargs(recipe, base, part)
        try:
            m = bb.load_part(part, base, kw, dtype)
        except (OSError, ValueError) as e:
            raise _wrap(base, part, e, bb) from None
        if isinstance(m, torch.nn.Module):
            m = m.to(device).eval()
        setattr(out, part, m)
    return out


def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int, device, *, preprocess: bool = True):
    """T5 embeddings as PixArtAlphaPipeline makes them: padded to ``max_length``, truncated, with EOS.

    With ``preprocess`` (default) each prompt is lower-cased and stripped first, as
    ``PixArtAlphaPipeline.encode_prompt`` does (without the optional bs4/ftfy caption cleaning) and
    as PixArt-alpha's training text pipeline did; T5's vocabulary is case-sensitive, so skipping
    this would feed the model text unlike what it was trained on.
    Returns ``(prompt_embeds [B, L, D], attention_mask [B, L])`` on ``device``. Gradients flow when
    the caller has them enabled (the text encoder may carry LoRA weights being trained).
    """
    texts = [p.lower().strip() if preprocess else p for p in prompts]
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    ids = enc.input_ids.to(device)
    mask = enc.attention_mask.to(device)
    embeds = text_encoder(ids, attention_mask=mask)[0]
    return embeds, mask
