"""Loading Hugging Face models for the caption stage: id or local dir, offline-aware, clear errors.

``medsynth.models.loading`` (shared by every stage) provides ``resolve_device`` /
``resolve_dtype`` / ``load_tokenizer``; this module uses them when present and otherwise falls
back to the small equivalents below, so the caption stage does not depend on the order in
which the stages were written.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import console
from ..errors import UserError

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_device(spec: str):
    try:
        from ..models.loading import resolve_device as shared
    except ImportError:
        shared = None
    if shared is not None:
        return shared(spec)
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"caption.device: {spec!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"caption.device: {spec!r} asked for CUDA but no CUDA GPU is visible; use --set caption.device=cpu (slow) or auto")
    return dev


def resolve_dtype(name: str, device):
    import torch

    try:
        from ..models.loading import resolve_dtype as shared
    except ImportError:
        shared = None
    dtype = shared(name) if shared is not None else getattr(torch, _DTYPES[name])
    if device.type == "cpu" and dtype == torch.float16:
        # Several CPU kernels have no fp16 implementation; fp32 is the working choice there.
        console.warn("caption.dtype fp16 is not supported on the CPU; using fp32 (set caption.dtype: fp32 to silence this)")
        return torch.float32
    return dtype


def model_ref(ref: str, key: str) -> tuple[str, dict]:
    """(name for from_pretrained, its kwargs) for a hub id or a local directory."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return str(p), {"local_files_only": True}
    if ref.startswith((".", "/", "~")) or os.sep in ref and ref.count("/") > 1 or p.suffix in (".safetensors", ".bin"):
        raise UserError(f"{key}: {ref!r} is not a directory; give a Hugging Face id (e.g. llava-hf/llama3-llava-next-8b-hf) "
                        "or a local directory made with save_pretrained / `hf download ID --local-dir DIR`")
    return ref, {"local_files_only": offline()}


def missing_weights(ref: str, key: str, err: Exception) -> UserError:
    where = "local directory" if Path(ref).expanduser().is_dir() else "Hugging Face id"
    how = (f"download it where there is internet (`hf download {ref}`; with HF_HUB_OFFLINE=1 set, only the local cache is used) "
           f"or point {key} at a local directory holding the model (--set {key}=DIR)")
    if where == "local directory":
        how = f"check that {ref} holds a complete save_pretrained() folder (config.json, weights, processor/tokenizer files)"
    return UserError(f"{key}: cannot load {ref!r} ({where}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; {how}")


def load_base_tokenizer(recipe):
    """The base model's T5 tokenizer (counts caption tokens the way the text encoder sees them)."""
    try:
        from ..models.loading import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(recipe)
    # Fallback while medsynth.models.loading is not available: a real (diffusers-layout) base only.
    base = recipe.model.base
    if base == "tiny":
        raise UserError("model.base 'tiny': its tokenizer is built by medsynth.models.loading, which this install lacks; "
                        "reinstall medsynth")
    from transformers import AutoTokenizer

    name, kw = model_ref(base, "model.base")
    try:
        return AutoTokenizer.from_pretrained(name, subfolder="tokenizer", revision=recipe.model.revision, **kw)
    except (OSError, ValueError) as e:
        raise missing_weights(base, "model.base", e) from None
