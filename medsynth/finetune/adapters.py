"""Final adapters of a finetune run: writing them, hashing them, loading them for inference.

``<workdir>/finetune/final/``::

    transformer/                       PEFT adapter dir (PeftModel.from_pretrained) or, for
                                       adapter=full, the whole DiT saved with save_pretrained
    text_encoder/                      PEFT adapter dir (when T5 carries LoRA)
    pytorch_lora_weights.safetensors   diffusers-style LoRA state dict: "transformer.<module>.lora_A.weight",
                                       "text_encoder.<module>.lora_B.weight", ... (LoRA configs in the
                                       safetensors metadata)
    adapter.json                       kind lora|full, base, targets, rank, alpha, dora, recipe hash, step
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

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


def save_diffusers_lora(parts: dict[str, tuple[torch.nn.Module, object]], path: Path) -> None:
    """One safetensors file with every LoRA tensor, keys prefixed by the component name."""
    from safetensors.torch import save_file

    tensors, meta = {}, {"format": "pt"}
    for prefix, (model, cfg) in parts.items():
        for k, v in peft_state(model).items():
            tensors[f"{prefix}.{k}"] = v
        meta[f"{prefix}_lora_config"] = json.dumps(cfg.to_dict(), default=list)
    if tensors:
        save_file(tensors, str(path), metadata=meta)


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


def _replace(components, **kw):
    if dataclasses.is_dataclass(components):
        return dataclasses.replace(components, **kw)
    if hasattr(components, "_replace"):
        return components._replace(**kw)
    for k, v in kw.items():
        setattr(components, k, v)
    return components


def apply_finetuned(components, finetune_dir: Path):
    """Load the final adapters onto freshly loaded base ``components`` for inference.

    LoRA is merged into the base weights (no adapter overhead while sampling); a full DiT
    replaces the base transformer. Returns the updated components.
    """
    from peft import PeftModel

    finetune_dir = Path(finetune_dir)
    root = finetune_dir / "final" if (finetune_dir / "final").is_dir() else finetune_dir
    info = read_adapter_info(finetune_dir)
    updates = {}
    tr = components.transformer
    if tr is not None:
        p = next(tr.parameters())
        if info["kind"] == "full":
            from diffusers import PixArtTransformer2DModel

            updates["transformer"] = PixArtTransformer2DModel.from_pretrained(
                str(root / "transformer"), torch_dtype=p.dtype).to(p.device).eval()
        else:
            m = PeftModel.from_pretrained(tr, str(root / "transformer"))
            updates["transformer"] = m.merge_and_unload().to(p.dtype).eval()
    te = getattr(components, "text_encoder", None)
    if te is not None and (root / "text_encoder" / "adapter_config.json").is_file():
        p = next(te.parameters())
        m = PeftModel.from_pretrained(te, str(root / "text_encoder"))
        updates["text_encoder"] = m.merge_and_unload().to(p.dtype).eval()
    return _replace(components, **updates)
