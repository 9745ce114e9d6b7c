"""The finetune stage (Med-Art core): LoRA on PixArt-alpha's DiT and T5 with the HLDF colour loss.

``run(recipe, resume=False, max_steps=None) -> Path`` trains and writes ``<workdir>/finetune/``;
``adapters.apply_finetuned`` loads the result onto base components for inference.
See docs/finetune.md.
"""

from __future__ import annotations

from pathlib import Path


def run(recipe, resume: bool = False, max_steps: int | None = None) -> Path:
    """Fine-tune ``recipe.model.base`` on the prepared train split; returns ``<workdir>/finetune``."""
    from .loop import run as _run

    return _run(recipe, resume=resume, max_steps=max_steps)


__all__ = ["run", "summary"]


def summary(out_dir: Path) -> dict:
    """Small JSON-able summary of a finished run (for `--json`)."""
    import json

    out_dir = Path(out_dir)
    info = json.loads((out_dir / "final" / "adapter.json").read_text())
    last = None
    log = out_dir / "log.jsonl"
    if log.is_file():
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        last = json.loads(lines[-1]) if lines else None
    return {"finetune_dir": str(out_dir), "final": str(out_dir / "final"), "adapter": info["kind"],
            "steps": info["step"], "last_log": last}
