"""Final adapters of a finetune run: writing them, hashing them, loading them for inference.

``<workdir>/finetune/final/``::

    <denoiser>/        PEFT adapter dir (PeftModel.from_pretrained) or, for adapter=full, the
                       whole denoiser saved with save_pretrained (PixArt: transformer/)
    <text encoder>/    PEFT adapter dir per text encoder that carried LoRA (PixArt: text_encoder/)
    adapter.json       family, kind lora|full, base, resolution, targets, rank, alpha, dora, recipe hash, step

The folders are named like the base's sub-folders, so a finetune output mirrors the diffusers
layout of its base. There is no single-file diffusers LoRA (``pytorch_lora_weights.safetensors``):
diffusers has no LoRA loader for PixArt (``PixArtAlphaPipeline`` has no ``load_lora_weights``,
and ``PixArtTransformer2DModel`` no ``load_lora_adapter``, checked on diffusers 0.42), so such a
file would load nowhere. The PEFT folders are the format; :func:`load_finetuned` applies them to
a stock pipeline of the family adapter.json names (outputs older than the ``family`` key are
PixArt's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .. import console
from ..errors import UserError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "config.json",
                 "diffusion_pytorch_model.safetensors")


def final_dir(recipe) -> Path:
    return recipe.workdir_path / "finetune" / "final"


def peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}


def save_peft_dir(model: torch.nn.Module, lora_cfg, out: Path, base: str, subfolder: str) -> None:
    """A directory ``PeftModel.from_pretrained(base_model, out)`` loads.

    PeftModel keeps the wrapped model under ``base_model.model.``; its own save_pretrained writes
    that prefix, so we write it too (the model here was injected in place, not wrapped).
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {f"base_model.model.{k}": v for k, v in peft_state(model).items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = dataclasses.replace(lora_cfg, base_model_name_or_path=f"{base}/{subfolder}" if base else None)
    cfg.save_pretrained(str(out))


def adapter_hash(finetune_dir: Path) -> str:
    """sha256 over the adapter files of ``<finetune_dir>/final`` (names and contents, sorted)."""
    finetune_dir = Path(finetune_dir)
    root = finetune_dir / "final" if (finetune_dir / "final").is_dir() else finetune_dir
    if not (root / "adapter.json").is_file():
        raise UserError(f"{root} holds no finished adapters (adapter.json missing): run `medsynth finetune` first")
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            with open(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def read_adapter_info(finetune_dir: Path) -> dict:
    finetune_dir = Path(finetune_dir)
    root = finetune_dir / "final" if (finetune_dir / "final").is_dir() else finetune_dir
    path = root / "adapter.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `medsynth finetune` with this recipe first "
                        f"(or point at a finetune directory that has a final/ folder)")
    return json.loads(path.read_text())


def _root(finetune_dir) -> Path:
    finetune_dir = Path(finetune_dir).expanduser()
    return finetune_dir / "final" if (finetune_dir / "final").is_dir() else finetune_dir


def backbone_of(info: dict):
    """The backbone a finetune output was trained with (adapter.json ``family``; absent = the default)."""
    from ..models.backbone import DEFAULT_FAMILY, get

    return get(info.get("family") or DEFAULT_FAMILY)


def lora_parts(finetune_dir) -> tuple[str, ...]:
    """The components that carry a LoRA in this finetune output (e.g. 'transformer', 'text_encoder'):
    the denoiser first, then the text encoders, in the backbone's order."""
    root = _root(finetune_dir)
    found = [p.name for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()] if root.is_dir() else []
    try:
        bb = backbone_of(read_adapter_info(root))
        order = [bb.denoiser_part, *bb.text_encoder_parts]
    except UserError:
        order = []
    return tuple(sorted(found, key=lambda p: (order.index(p) if p in order else len(order), p)))


def _load_lora(model: torch.nn.Module, adapter_dir: Path, merge: bool, stored=None) -> torch.nn.Module:
    """Apply the PEFT adapter in ``adapter_dir`` to ``model`` in place; returns that same model.

    The merge runs per layer in float32 (the base layer is upcast, the LoRA delta added, the sum
    cast back): peft's own merge adds a delta cast to the weight's dtype, and a bf16 weight
    (8 significant bits) rounds an update below half its spacing away entirely. ``stored``
    (:class:`medsynth.models.loading.StoredWeights` of the part) gives each merged layer's weight
    as the files hold it, so the delta is added to the unrounded weight and the sum rounded once;
    a layer the files do not hold under its module name is merged against its loaded weight.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    # autocast_adapter_dtype (peft's default) keeps the adapter weights in float32 on a bf16/fp16 base.
    wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    if not merge:
        return model
    missed = []
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer"):
            base = layer.get_base_layer()
            dtype = base.weight.dtype
            base.float()
            if stored is not None and dtype != torch.float32:
                w = stored.get(f"{name}.weight")
                if w is not None and w.shape == base.weight.shape:
                    with torch.no_grad():
                        base.weight.copy_(w)
                else:
                    missed.append(name)
            layer.merge()
            base.to(dtype)
    if missed:
        console.warn(f"{adapter_dir}: {len(missed)} LoRA layer(s) (e.g. {missed[0]}) were merged into their "
                     f"{str(dtype).replace('torch.', '')} weights, not into the stored ones: the base's files do not "
                     "hold them under the module's name")
    return wrapped.unload()  # the merged base layers back in place of the LoRA wrappers


def adapter_parts(finetune_dir) -> tuple[str, ...]:
    """Every component a finetune output may change: its backbone's denoiser and text encoders."""
    bb = backbone_of(read_adapter_info(_root(finetune_dir)))
    return (bb.denoiser_part, *bb.text_encoder_parts)


def apply_finetuned(components, finetune_dir, *, merge: bool = True, parts=None, base: str | None = None,
                    revision: str | None = None):
    """Apply the final adapters of ``finetune_dir`` to ``components`` in place and return them.

    ``components`` is anything with the backbone's part attributes (medsynth's
    :class:`~medsynth.models.loading.Components`, or the family's stock pipeline); only ``parts``
    (default: the denoiser and text encoders) are touched, and a part that is None is skipped.
    LoRA is merged into the base weights in float32, then cast back to the weights' dtype;
    with ``base`` (the id or directory the components were loaded from) a part loaded in bf16 /
    fp16 is merged against the weights as ``base``'s files store them, read one layer at a time
    (:func:`medsynth.models.loading.stored_weights`), so each weight is rounded once.
    ``merge=False`` leaves the LoRA layers in. With ``kind: full`` the fine-tuned denoiser
    replaces the loaded one (same dtype and device).
    """
    from ..models.loading import stored_weights

    def lora(model, part):
        stored = stored_weights(base, part, revision) if (base and merge) else None
        return _load_lora(model, root / part, merge, stored).eval()

    root = _root(finetune_dir)
    info = read_adapter_info(root)
    bb = backbone_of(info)
    parts = tuple(adapter_parts(root) if parts is None else parts)
    den = info.get("denoiser") or bb.denoiser_part
    have = lora_parts(root)
    tr = getattr(components, den, None) if den in parts else None
    if tr is not None:
        p = next(tr.parameters())
        if info.get("kind") == "full":
            setattr(components, den, bb.load_full_denoiser(root / den, p.dtype).to(p.device).eval())
        elif den in have:
            setattr(components, den, lora(tr, den))
        else:
            raise UserError(f"{root / 'adapter.json'} says kind {info.get('kind')!r} but {root / den} holds "
                            "no PEFT adapter (adapter_config.json): the finetune output is incomplete; "
                            "rerun `medsynth finetune`")
    for part in parts:
        if part == den:
            continue
        te = getattr(components, part, None)
        if te is not None and part in have:
            setattr(components, part, lora(te, part))
    return components


def load_finetuned(pipe, finetune_dir, *, merge: bool = True):
    """Apply a medsynth finetune output to a stock diffusers pipeline in place; returns ``pipe``.

    For PixArt: a ``PixArtAlphaPipeline`` (``PixArtSigmaPipeline`` for a Σ base). ``finetune_dir``
    is ``<workdir>/finetune`` or its ``final/`` folder. ``pipe`` must be built from the same base
    (``<Pipeline>.from_pretrained(model.base)``)
    and keep its text encoder when the finetune trained a text-encoder LoRA. See
    :func:`apply_finetuned` for ``merge``.
    """
    root = _root(finetune_dir)
    info = read_adapter_info(root)  # a clear error for a directory that is no finetune output
    den = info.get("denoiser") or backbone_of(info).denoiser_part
    missing = [p for p in (den,) + lora_parts(root) if getattr(pipe, p, None) is None]
    if missing:
        raise UserError(f"load_finetuned: the pipeline has no {' or '.join(sorted(set(missing)))}, but {root} holds "
                        f"fine-tuned weights for it; build the pipeline with every component "
                        "(<Pipeline>.from_pretrained(base))")
    # The pipeline's own base (from_pretrained's id or directory): LoRA merges against its stored weights.
    return apply_finetuned(pipe, root, merge=merge, base=getattr(pipe, "name_or_path", None) or None)
