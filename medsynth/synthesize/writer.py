"""Output side of synthesis: shards or class folders, completeness checks, index.json, the grid.

Layout of ``<out>/`` (docs/output-format.md)::

    synth-000000.tar ...   webdataset shards (or <class>/<key>.png with --format imagefolder)
    plan.json              the plan and settings fingerprint (written first; resume checks it)
    index.json             classes, counts per class and per shard, plan, settings (written last)
    _info.json             split info for timm's `wds/` reader
    metadata.jsonl         imagefolder only: one line per image (Hugging Face `imagefolder` layout)
    grid.png               first images of every class, one row per class
    README.md              the dataset card (Hugging Face YAML header; card.py)
    config.yaml, provenance.json

A shard appears under its final name only when complete (temporary name, fsync, rename),
so "the file exists" is the completeness test and a killed run leaves only temporary files,
which the next run deletes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from ..workspace import _os_error, atomic_path, atomic_write_bytes, atomic_write_json
from .plan import Plan, Sample

SHARD_PATTERN = "synth-%06d.tar"
# Files this stage owns in an output directory (everything else there is left alone).
OWN_FILES = ("plan.json", "index.json", "_info.json", "metadata.jsonl", "grid.png", "config.yaml", "provenance.json",
             "README.md")
# Fixed tar metadata: the same samples give byte-identical shards (no wall-clock mtime, no local user).
TAR_MTIME = 0
TAR_USER = "medsynth"


def shard_name(s: int) -> str:
    return SHARD_PATTERN % s


def encode_image(arr: np.ndarray, image_format: str, jpg_quality: int) -> bytes:
    """uint8 HxWx3 -> PNG (lossless, the default) or JPEG bytes; deterministic for the same pixels."""
    buf = io.BytesIO()
    img = Image.fromarray(arr, mode="RGB") if arr.ndim == 3 else Image.fromarray(arr)
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=jpg_quality)
    return buf.getvalue()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}."


def remove_stale_temps(out: Path, names: list[str]) -> int:
    """Delete temporary files left by a killed run for the given final names (this worker's shards)."""
    n = 0
    wanted = {_tmp_prefix(out / name) for name in names}
    if not out.is_dir():
        return 0
    for p in out.iterdir():
        if p.name.endswith(".tmp") and any(p.name.startswith(w) for w in wanted):
            p.unlink(missing_ok=True)
            n += 1
    return n


# ----------------------------------------------------------------------------- webdataset


def shard_members(path: Path) -> list[str] | None:
    """Member names of a tar, or None when it cannot be read to the end (truncated, not a tar)."""
    try:
        with tarfile.open(path, "r:") as tf:
            return [m.name for m in tf.getmembers()]
    except (tarfile.TarError, OSError, EOFError):
        return None


def expected_members(samples: list[Sample], ext: str) -> list[str]:
    # TarWriter writes a sample's members in sorted extension order: cls, json, png|jpg.
    return [f"{s.key}.{e}" for s in samples for e in sorted(("cls", "json", ext))]


def shard_complete(out: Path, s: int, samples: list[Sample], ext: str) -> bool:
    path = out / shard_name(s)
    if not path.is_file():
        return False
    return shard_members(path) == expected_members(samples, ext)


class ShardWriter:
    """One webdataset shard: written to a temporary file, renamed when the last sample is in."""

    def __init__(self, out: Path, s: int):
        import webdataset as wds

        self.final = out / shard_name(s)
        try:
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(self.final), suffix=".tmp", dir=out)
        except OSError as e:
            raise _os_error(self.final, e) from None
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "wb")
        # encoder=False: members are bytes we encoded ourselves (PNG/JPEG settings stay ours).
        self.tw = wds.TarWriter(self.fh, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_USER)

    def write(self, key: str, image: bytes, ext: str, cls: int, meta: dict) -> None:
        self.tw.write({"__key__": key, ext: image, "cls": str(cls).encode(),
                       "json": json.dumps(meta, sort_keys=True).encode("utf-8")})

    def commit(self) -> Path:
        self.tw.close()  # closes the tar stream (end-of-archive blocks), not our file handle
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            # mkstemp creates 0600; a data set is meant to be read by others (as the umask allows).
            os.fchmod(self.fh.fileno(), 0o666 & ~_umask())
            self.fh.close()
            os.replace(self.tmp, self.final)
        except OSError as e:
            self.abort()
            raise _os_error(self.final, e) from None
        return self.final

    def abort(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- imagefolder


class ShardSink:
    """Where one shard's samples go: a WebDataset tar (committed when the shard is complete, aborted
    on any error) or, for ``imagefolder``, one file per sample. Used as a context manager by both the
    plain and the curated synthesis loops."""

    def __init__(self, out: Path, s: int, fmt: str, ext: str):
        self.out, self.ext = out, ext
        self.tar = ShardWriter(out, s) if fmt == "webdataset" else None

    def done(self, sample: Sample) -> bool:
        """imagefolder resume: this sample's file is already written (a tar is always rewritten whole)."""
        return self.tar is None and image_path(self.out, sample, self.ext).is_file()

    def write(self, sample: Sample, data: bytes, meta: dict) -> None:
        if self.tar is not None:
            self.tar.write(sample.key, data, self.ext, sample.cls, meta)
        else:
            write_image_file(self.out, sample, data, self.ext)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.tar is not None:
            if exc_type is None:
                self.tar.commit()
            else:
                self.tar.abort()
        return False


def image_path(out: Path, sample: Sample, ext: str) -> Path:
    return out / sample.label / f"{sample.key}.{ext}"


def chunk_complete_imagefolder(out: Path, samples: list[Sample], ext: str) -> bool:
    return all(image_path(out, x, ext).is_file() for x in samples)


def remove_stale_image_temps(out: Path, samples: list[Sample]) -> int:
    """Delete temporary image files a killed run left for these samples (atomic_path's '.<name>.*.tmp')."""
    n = 0
    prefixes: dict[str, set[str]] = {}
    for x in samples:
        prefixes.setdefault(x.label, set()).add(f".{x.key}.")
    for label, pre in prefixes.items():
        d = out / label
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.endswith(".tmp") and p.name[: p.name.find(".", 1) + 1] in pre:
                p.unlink(missing_ok=True)
                n += 1
    return n


def write_image_file(out: Path, sample: Sample, data: bytes, ext: str) -> None:
    atomic_write_bytes(image_path(out, sample, ext), data)


# ----------------------------------------------------------------------------- reading back


def iter_shard(path: Path):
    """(key, {ext: bytes}) of a shard in order (used for the grid and by tests/docs)."""
    with tarfile.open(path, "r:") as tf:
        current, members = None, {}
        for m in tf:
            key, _, ext = m.name.partition(".")
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            f = tf.extractfile(m)
            members[ext] = f.read() if f else b""
        if current is not None:
            yield current, members


def first_images(out: Path, plan: Plan, fmt: str, ext: str, k: int) -> dict[str, list[Image.Image]]:
    """The first k images (by index) of every class, for the grid."""
    want = {c["name"]: min(k, plan.counts[c["name"]]) for c in plan.classes}
    got: dict[str, list[Image.Image]] = {n: [] for n in want}
    if fmt == "imagefolder":
        for n, m in want.items():
            for i in range(m):
                p = out / n / f"{n}-{i:06d}.{ext}"
                got[n].append(Image.open(p).convert("RGB"))
        return got
    key_to_label = {}
    for x in plan.samples():
        if x.index < want[x.label]:
            key_to_label[x.key] = x.label
    for s in range(plan.n_shards):
        if not key_to_label:
            break
        for key, members in iter_shard(out / shard_name(s)):
            label = key_to_label.pop(key, None)
            if label is not None:
                got[label].append(Image.open(io.BytesIO(members[ext])).convert("RGB"))
    return got


def make_grid(images: dict[str, list[Image.Image]], cell: int) -> Image.Image | None:
    """One row per class: the class name, then its first images."""
    from PIL import ImageDraw

    rows = [(n, ims) for n, ims in images.items() if ims]
    if not rows:
        return None
    label_w = max(120, 7 * max(len(n) for n, _ in rows) + 10)
    cols = max(len(ims) for _, ims in rows)
    grid = Image.new("RGB", (label_w + cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, ims) in enumerate(rows):
        draw.text((5, r * cell + cell // 2 - 5), name, fill="black")
        for c, im in enumerate(ims):
            grid.paste(im.resize((cell, cell), Image.BICUBIC), (label_w + c * cell, r * cell))
    return grid


def write_grid(path: Path, grid: Image.Image) -> None:
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def write_index(out: Path, plan: Plan, fmt: str, ext: str, settings: dict, prompts_info: dict,
                fingerprint: str, curation: dict | None = None) -> Path:
    """index.json (+ _info.json for timm, metadata.jsonl for imagefolder), from the plan.

    Everything here follows from the plan, so any worker (or a rerun) writes the same file.
    """
    names = [c["name"] for c in plan.classes]
    shards = []
    if fmt == "webdataset":
        for s in range(plan.n_shards):
            samples = plan.shard(s)
            per = Counter(x.label for x in samples)
            shards.append({"file": shard_name(s), "count": len(samples),
                           "counts": {n: per[n] for n in names if per[n]},
                           "first_key": samples[0].key, "last_key": samples[-1].key})
    index = {
        "format": fmt,
        "image_format": ext,
        "version": 1,
        "classes": [{"index": c["index"], "name": c["name"], "category": c.get("category")} for c in plan.classes],
        "class_to_index": {c["name"]: c["index"] for c in plan.classes},
        "counts": {n: plan.counts[n] for n in names},
        "total": plan.total,
        "shards": shards,
        "plan": plan.to_dict(),
        "prompts": prompts_info,
        "settings": settings,
        "fingerprint": fingerprint,
        **({"curation": curation} if curation else {}),
    }
    if fmt == "webdataset":
        # timm's `wds/` reader looks for _info.json with per-split file lists and lengths.
        atomic_write_json(out / "_info.json", {"name": "medsynth-synthetic", "splits": {"train": {
            "name": "train", "num_samples": plan.total, "filenames": [x["file"] for x in shards],
            "shard_lengths": [x["count"] for x in shards]}}})
    else:
        lines = [json.dumps({"file_name": f"{x.label}/{x.key}.{ext}", "label": x.label, "cls": x.cls, "key": x.key},
                            sort_keys=True) for x in plan.samples()]
        atomic_write_bytes(out / "metadata.jsonl", ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
    return atomic_write_json(out / "index.json", index)


def check_out_dir(out: Path, fingerprint: str) -> str:
    """'new' (empty or absent), 'same' (our plan with this fingerprint) or 'other' (our plan, other settings).

    A non-empty directory without our plan.json is refused: we never delete files we did not write.
    """
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; choose a directory")
    plan_file = out / "plan.json"
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            old = {}
        return "same" if old.get("fingerprint") == fingerprint else "other"
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if entries:
        raise UserError(f"--out {out}: the directory is not empty and holds no medsynth synthesis (no plan.json); "
                        "choose an empty or new directory")
    return "new"


def discard_previous(out: Path, plan_file_data: dict | None) -> int:
    """Remove a previous synthesis of other settings: our shards, class-folder images and records."""
    n = 0
    cur = out / ".curate"  # scored candidates of curation (curate.py): only valid for those settings
    if cur.is_dir():
        import shutil

        n += sum(1 for _ in cur.rglob("*"))
        shutil.rmtree(cur)
    for p in out.iterdir():
        name = p.name
        if p.is_file() and ((name.startswith("synth-") and name.endswith(".tar"))
                            or name in OWN_FILES or (name.startswith(".synth-") and name.endswith(".tmp"))):
            p.unlink(missing_ok=True)
            n += 1
    old_classes = (plan_file_data or {}).get("classes") or []
    for c in old_classes:
        d = out / c
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and (f.name.startswith(f"{c}-") or f.name.startswith(f".{c}-")):
                    f.unlink(missing_ok=True)
                    n += 1
            try:
                d.rmdir()
            except OSError:
                pass  # holds files we did not write: leave it
    return n
