"""LoRA injection (peft) and training modes, for any backbone's denoiser and text encoders.

The target presets belong to each family (``Backbone.lora_targets``; the PixArt presets are
documented in :mod:`medsynth.models.pixart`). diffusers' DiT classes have no ``add_adapter``;
peft's ``inject_adapter_in_model`` adds the LoRA layers in place, so the model keeps its class
(``.config``, gradient checkpointing, ``save_pretrained``) and DDP wraps it like any module.
"""

from __future__ import annotations

import torch

def matched_modules(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Names of the Linear/Conv2d modules that peft's suffix matching hits (for docs and tests)."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            out.append(name)
    return out


def lora_config(lcfg, targets: list[str]):
    """peft LoraConfig from ``recipe.finetune.lora`` and a target list."""
    from peft import LoraConfig

    return LoraConfig(
        r=lcfg.rank,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        init_lora_weights="gaussian" if lcfg.init == "gaussian" else True,
        use_dora=lcfg.dora,
        target_modules=list(targets),
    )


def add_lora(model: torch.nn.Module, lcfg, targets: list[str], what: str):
    """Freeze ``model`` and inject LoRA layers (trainable, fp32 masters). Returns the LoraConfig."""
    from peft import inject_adapter_in_model

    from ..errors import UserError

    hits = matched_modules(model, targets)
    if not hits:
        raise UserError(f"LoRA targets {targets} match no layer of the {what}; check finetune.lora settings "
                        f"for this base model")
    cfg = lora_config(lcfg, targets)
    model.requires_grad_(False)
    inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            # Adapter master weights stay fp32 even when the base is bf16/fp16 (the official code
            # kept them in bf16, where small updates round away).
            p.data = p.data.float()
    return cfg


def expected_lora_params(model: torch.nn.Module, targets: list[str], rank: int, dora: bool = False) -> int:
    """LoRA parameter count from the shapes of the matched layers (independent of peft)."""
    n = 0
    for name in matched_modules(model, targets):
        mod = model.get_submodule(name)
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            n += rank * mod.in_channels * k + mod.out_channels * rank
        else:
            n += rank * mod.in_features + mod.out_features * rank
        if dora:
            n += mod.out_channels if isinstance(mod, torch.nn.Conv2d) else mod.out_features
    return n


def trainable_parameters(*models) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


def set_train_mode(module: torch.nn.Module, base_dropout: bool) -> torch.nn.Module:
    """Put a (LoRA-carrying) model into training mode as ``finetune.base_dropout`` says; returns it.

    ``base_dropout`` true: ``module.train()``, so every dropout of the frozen base is active (T5 v1.1
    ships ``dropout_rate: 0.1``). False (default): the base runs in eval mode (deterministic, as
    at inference) and only peft's ``lora_dropout`` modules train. Modules with gradient
    checkpointing switched on get their own ``training`` flag back, not their children's:
    transformers checkpoints a layer only while that flag is set, and it changes nothing else there
    (dropout lives in child modules and the attention module). Works through DDP wrappers.
    """
    from ..sampling import unwrap

    if base_dropout:
        return module.train()
    module.eval()
    for name, sub in unwrap(module).named_modules():
        if "lora_dropout" in name.split("."):
            sub.train()
        elif getattr(sub, "gradient_checkpointing", False) is True and _checkpoints_by_training_flag(sub):
            sub.training = True
    return module


def _checkpoints_by_training_flag(sub: torch.nn.Module) -> bool:
    """A transformers layer (>= 4.50: GradientCheckpointingLayer) or stack (older: the T5Stack
    PreTrainedModel) that checkpoints only in training mode. Not T5Attention, which also carries
    a ``gradient_checkpointing`` flag but reads ``training`` for its attention dropout."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    kinds: tuple[type, ...] = (PreTrainedModel,)
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        kinds += (GradientCheckpointingLayer,)
    except ImportError:
        pass
    return isinstance(sub, kinds)
