"""Workspace helpers every stage uses: atomic writes, hashing, provenance records.

Layout of a workspace (``recipe.workdir``)::

    manifest.csv          prepare: path,label,split,sha256,width,height
    classes.json          prepare: class order, category texts, counts
    prepare/              prepare: config.yaml, provenance.json, bad_images.csv
    captions.jsonl        caption
    finetune/ synthetic/ classify/<train_on>/ score/

Every stage directory holds ``config.yaml`` (the resolved recipe) and ``provenance.json``
(versions, seed, input hashes, the stage fingerprint, whether it completed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

TRACKED_PACKAGES = (
    "medsynth", "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate",
    "timm", "webdataset", "numpy", "pillow", "scikit-learn", "safetensors", "tokenizers",
)


def _os_error(path: Path, e: OSError) -> UserError:
    reason = e.strerror or str(e)
    fix = "free some space or choose another workdir" if getattr(e, "errno", None) == 28 else \
        "check that the directory exists and is writable, or choose another workdir (--set workdir=DIR)"
    return UserError(f"cannot write {path}: {reason}; {fix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode_suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Nothing half-written is ever visible under the final name; on error the temporary
    file is removed and OSErrors become a UserError naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + mode_suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _os_error(path, e) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _os_error(path, e) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def ensure_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(path, e) from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write to {path}: the directory is read-only; choose another workdir (--set workdir=DIR) or fix its permissions")
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def fingerprint(config: Any, inputs: dict[str, str] | None = None) -> str:
    """Hash of a stage's resolved settings and its input files' hashes: equal = nothing changed."""
    return sha256_json({"config": config, "inputs": inputs or {}})


def write_provenance(stage_dir: str | os.PathLike, recipe, stage: str, *,
                     inputs: dict[str, str] | None = None, config: Any = None,
                     complete: bool = True, extra: dict | None = None) -> Path:
    """Write ``config.yaml`` (resolved recipe) and ``provenance.json`` into ``stage_dir``.

    ``inputs`` maps input names to their sha256; ``config`` is the part of the recipe the
    stage depends on (its fingerprint decides whether `medsynth run` may skip the stage).
    """
    from .recipe import recipe_yaml

    stage_dir = ensure_dir(stage_dir)
    atomic_write_text(stage_dir / "config.yaml", recipe_yaml(recipe))
    record = {
        "stage": stage,
        "complete": complete,
        "fingerprint": fingerprint(config, inputs),
        "seed": recipe.seed,
        "recipe": recipe.source,
        "overrides": list(recipe.overrides),
        "inputs": inputs or {},
        "versions": package_versions(),
        "argv": sys.argv,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        record.update(extra)
    atomic_write_json(stage_dir / "provenance.json", record)
    return stage_dir / "provenance.json"


def read_provenance(stage_dir: str | os.PathLike) -> dict | None:
    p = Path(stage_dir) / "provenance.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def read_yaml(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)
