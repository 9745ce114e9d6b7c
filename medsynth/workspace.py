"""Workspace helpers every stage uses: atomic writes, hashing, provenance records.

Layout of a workspace (``recipe.workdir``)::

    manifest.csv          prepare: path,label,split,sha256,width,height
    classes.json          prepare: class order, category texts, counts
    prepare/              prepare: config.yaml, provenance.json, bad_images.csv
    captions.jsonl        caption
    finetune/ synthetic/ classify/<train_on>/ score/
    .medsynth-workspace   the mark: JSON with the medsynth version and creation time

Stages write only into a marked workspace (:func:`claim` for prepare, :func:`require` for the
others), so a workdir pointed at a data folder or a folder of other files is refused before
anything in it is replaced.

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


# ----------------------------------------------------------------------------- the workspace mark

# A workdir medsynth created (or adopted) holds this file. Stages write only into marked folders, so
# a workdir pointed at a data folder or at someone's project folder is refused before anything in it
# is replaced (manifest.csv, captions.jsonl and the stage folders are common names).
MARK = ".medsynth-workspace"
# Folders medsynth writes into a workspace; in a data folder that an older version used as its
# workdir they are medsynth's outputs, not classes.
STAGE_DIRS = ("prepare", "caption", "finetune", "synthetic", "classify", "score", "tiny-base")
# `medsynth run` records its stage keys before prepare runs, so a new workdir may hold this already.
_OWN_FILES = frozenset({"stages.json"})
_FIX = "choose another workdir, e.g. --set workdir=runs/<name> (a new or empty folder)"


def is_workspace(path: str | os.PathLike) -> bool:
    """True when ``path`` carries medsynth's workspace mark."""
    return (Path(path) / MARK).is_file()


def is_legacy_workspace(path: str | os.PathLike) -> bool:
    """A workspace written by a medsynth version from before the mark: prepare's three outputs."""
    path = Path(path)
    if not ((path / "manifest.csv").is_file() and (path / "classes.json").is_file()):
        return False
    prov = read_provenance(path / "prepare")
    return bool(prov) and prov.get("stage") == "prepare"


def mark_workspace(path: str | os.PathLike) -> Path:
    """Write the mark (atomically): JSON with the medsynth version and the creation time."""
    from . import __version__

    return atomic_write_json(Path(path) / MARK, {
        "medsynth": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "what": "a medsynth workspace: every stage writes its outputs here (see docs/data.md)",
    })


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_data_folder(recipe, wd: Path) -> None:
    """The workdir may not be the data folder or lie inside it (data.root), nor be data.manifest's folder."""
    here = wd.expanduser().resolve()
    data = getattr(recipe, "data", None)
    root = getattr(data, "root", None)
    if root:
        r = Path(root).expanduser().resolve()
        if _within(here, r):
            where = "is the data folder" if here == r else "lies inside the data folder"
            raise UserError(
                f"workdir {wd} {where} (data.root: {root}); medsynth writes manifest.csv, captions.jsonl and its "
                f"stage folders into the workdir, which would replace files of yours and turn its own folders into "
                f"classes. Nothing was written; choose a workdir outside {r}, e.g. --set workdir=runs/<name> "
                f"(a new or empty folder)"
            )
    manifest = getattr(data, "manifest", None)
    if manifest:
        folder = Path(manifest).expanduser().resolve().parent
        if here == folder:
            raise UserError(
                f"workdir {wd} is the folder of data.manifest ({manifest}); medsynth would write its own manifest.csv, "
                f"captions.jsonl and stage folders among your files. Nothing was written; {_FIX}"
            )


def _foreign_entries(wd: Path) -> list[str]:
    return sorted(p.name for p in wd.iterdir() if p.name not in _OWN_FILES)


def _refuse_foreign(wd: Path, entries: list[str]) -> UserError:
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return UserError(
        f"workdir {wd} is not a medsynth workspace: it is not empty ({shown}) and has no {MARK} mark, so medsynth "
        f"will not write there (its outputs such as manifest.csv and captions.jsonl would replace files of the "
        f"same name). Nothing was written; {_FIX}"
    )


def check_workdir(recipe) -> Path:
    """Refuse, without writing anything, a workdir that ``prepare`` may not write into; return it.

    Allowed: a folder that does not exist yet, an empty one, a marked workspace or one made by an
    earlier medsynth version (manifest.csv + classes.json + prepare/provenance.json).
    """
    wd = Path(recipe.workdir_path).expanduser()
    _refuse_data_folder(recipe, wd)
    if not wd.exists():
        return wd
    if not wd.is_dir():
        raise UserError(f"workdir {wd} is a file, not a folder; {_FIX}")
    if is_workspace(wd) or is_legacy_workspace(wd):
        return wd
    entries = _foreign_entries(wd)
    if entries:
        raise _refuse_foreign(wd, entries)
    return wd


def claim(recipe) -> Path:
    """For ``prepare``, right before its first write: check the workdir, create it and mark it."""
    wd = check_workdir(recipe)
    ensure_dir(wd)
    if not is_workspace(wd):
        mark_workspace(wd)
    return wd


def require(recipe) -> Path:
    """For every stage after ``prepare``, before it reads or writes: the workdir must be a workspace.

    An unmarked workspace of an earlier version is recognised and marked; a workdir that is missing,
    empty, not a workspace or inside the data folder is refused before anything is written.
    """
    wd = Path(recipe.workdir_path).expanduser()
    _refuse_data_folder(recipe, wd)
    if is_workspace(wd):
        return wd
    if is_legacy_workspace(wd):
        try:
            mark_workspace(wd)
        except UserError:
            pass  # a read-only workspace: the stage reports the folder it cannot write, with its fix
        return wd
    entries = _foreign_entries(wd) if wd.is_dir() else []
    if entries:
        raise _refuse_foreign(wd, entries)
    raise UserError(f"{wd / 'classes.json'} not found: run `medsynth prepare` with this recipe first")
