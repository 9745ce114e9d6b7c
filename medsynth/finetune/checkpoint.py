"""Resumable training checkpoints: trainable weights, optimizer, LR schedule, RNG, data position.

Layout of ``<workdir>/finetune/checkpoints/step-0000300/``::

    trainable.safetensors   every trainable tensor (LoRA or full DiT weights), fp32
    optimizer.pt            optimizer state dict (loaded with weights_only=True)
    scheduler.json          LR scheduler state
    rng-<rank>.pt           python / numpy / torch / cuda / trainer / HLDF generator states per process
    state.json              step, micro-batch position, adapter settings (written last)

A checkpoint is written into a hidden temporary directory and renamed when complete, so a
kill -9 while saving leaves the previous checkpoint as the latest one. Only the base model
stays outside: it is frozen and reloaded from ``model.base``. We do not use
``Accelerator.save_state`` because it saves the whole (multi-GB, frozen) model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(out, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: Path) -> Path | None:
    cps = list_checkpoints(root)
    return cps[-1] if cps else None


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def begin(root: Path, step: int) -> Path:
    """Create (empty) the temporary directory of the checkpoint at ``step`` (main process)."""
    tmp = Path(root) / f".{PREFIX}{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_main(tmp: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict, scheduler_state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler_state, default=float))


def write_rng(tmp: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    torch.save(rng_state(generators), tmp / f"rng-{rank}.pt")


def finish(root: Path, tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write state.json, rename the temporary directory into place and prune old checkpoints."""
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, rank: int) -> dict:
    """Everything of one checkpoint for process ``rank`` (weights_only loading throughout)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        out = {
            "state": state,
            "trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            "scheduler": json.loads((path / "scheduler.json").read_text()),
        }
        rng_file = path / f"rng-{rank}.pt"
        if not rng_file.is_file():
            raise UserError(f"{path} has no RNG state for process {rank}: it was written by a run with fewer "
                            f"processes; resume with the same number of processes (accelerate launch --num_processes)")
        out["rng"] = torch.load(rng_file, weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); delete it to resume from the one before, "
                        f"or start afresh without --resume") from None
    return out
