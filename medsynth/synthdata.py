"""Reading the synthetic data set (``<workdir>/synthetic/``: synth-%06d.tar shards + index.json).

Shards follow DESIGN.md: sample key ``<class>-<index:06d>``, members ``png`` or ``jpg``,
``cls`` (integer label as text) and ``json`` (label name, prompt, seed, ...). index.json
(written last, so its presence means the set is complete) gives the classes, the shard list
and the total, which are checked against the workspace and the files. The imagefolder layout
(``synthesize.format: imagefolder``: <class>/<key>.png + metadata.jsonl) is read too.

The classifier needs exact epochs, a seeded global shuffle and several loader workers;
``webdataset.WebDataset`` streams shards with a shuffle buffer and splits work by shard,
which gives uneven or empty workers on the few shards a small experiment has. So we index
the tar members once (stdlib ``tarfile`` gives each member's byte offset) and read any
sample by seeking: a map-style data set over the same files webdataset writes and reads.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import UserError

IMAGE_EXTS = ("png", "jpg", "jpeg")


@dataclass(frozen=True)
class SynthSample:
    key: str
    shard: str  # path of the tar file
    offset: int  # byte offset of the image member's data
    size: int  # byte length of the image member
    label: int
    meta: dict


def synthetic_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "synthetic"


def _missing(workdir: Path, what: str) -> UserError:
    d = synthetic_dir(workdir)
    return UserError(
        f"{what} in {d}: run `medsynth synthesize` with this recipe first "
        "(or train on the real images with `medsynth classify --real-only`)"
    )


def shard_paths(workdir: str | Path) -> list[Path]:
    """Shard files present (a shard is renamed to its final name only when complete)."""
    return sorted(p for p in synthetic_dir(workdir).glob("synth-*.tar") if p.is_file())


def read_index(workdir: str | Path) -> dict:
    path = synthetic_dir(workdir) / "index.json"
    if not path.is_file():
        raise _missing(Path(workdir), "no synthetic data set (index.json missing)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-run `medsynth synthesize`") from None


def _index_classes(index: dict) -> dict[int, str] | None:
    """index.json's class table as {index: name}, accepting a list of names or of dicts, or a name->index map."""
    c = index.get("classes")
    if isinstance(c, list) and c and isinstance(c[0], dict):
        return {int(d["index"]): str(d["name"]) for d in c if "index" in d and "name" in d}
    if isinstance(c, list):
        return {i: str(n) for i, n in enumerate(c)}
    if isinstance(c, dict):
        return {int(v): str(k) for k, v in c.items()}
    return None


def _imagefolder_samples(workdir: Path, class_names: list[str]) -> list[SynthSample]:
    """`synthesize.format: imagefolder`: <class>/<key>.<ext> files listed in metadata.jsonl."""
    d = synthetic_dir(workdir)
    meta_path = d / "metadata.jsonl"
    if not meta_path.is_file():
        raise _missing(workdir, "index.json says imagefolder but metadata.jsonl is missing")
    out = []
    for n, line in enumerate(meta_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            path, label = d / rec["file_name"], int(rec["cls"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{meta_path}:{n}: expected JSON with file_name and cls; re-run `medsynth synthesize`") from None
        if not path.is_file():
            raise UserError(f"{path} (listed in {meta_path}:{n}) is missing; re-run `medsynth synthesize`")
        if not 0 <= label < len(class_names) or rec.get("label", class_names[label]) != class_names[label]:
            raise UserError(f"{meta_path}:{n}: label {rec.get('label')!r} / cls {label} does not match the workspace "
                            f"classes {class_names}")
        out.append(SynthSample(str(rec.get("key", path.stem)), str(path), 0, path.stat().st_size, label,
                               {"label": class_names[label]}))
    return out


def index_samples(workdir: str | Path, class_names: list[str]) -> list[SynthSample]:
    """Every synthetic sample (key order within shard order), checked against the workspace classes."""
    workdir = Path(workdir)
    index = read_index(workdir)
    table = _index_classes(index)
    if table is not None:
        _check_classes(workdir, table, class_names)
    if index.get("format") == "imagefolder":
        samples = _imagefolder_samples(workdir, class_names)
    else:
        samples = _shard_samples(workdir, index, class_names)
    if not samples:
        raise _missing(workdir, "the synthetic data set holds no samples")
    total = index.get("total")
    if isinstance(total, int) and total != len(samples):
        raise UserError(f"{synthetic_dir(workdir) / 'index.json'} lists {total} samples but {len(samples)} were found; "
                        "the synthetic data set is incomplete or was changed. Re-run `medsynth synthesize`.")
    return samples


def _check_classes(workdir: Path, table: dict[int, str], class_names: list[str]) -> None:
    expected = dict(enumerate(class_names))
    wrong = {i: n for i, n in table.items() if expected.get(i) != n}
    if wrong:
        raise UserError(
            f"{synthetic_dir(workdir) / 'index.json'}: its classes {sorted(table.items())} do not match the "
            f"workspace classes {sorted(expected.items())}; the synthetic data was made for another class list. "
            "Re-run `medsynth synthesize` with this recipe."
        )


def _shard_samples(workdir: Path, index: dict, class_names: list[str]) -> list[SynthSample]:
    listed = [x.get("file") for x in index.get("shards") or [] if isinstance(x, dict)]
    if listed and all(isinstance(f, str) for f in listed):
        shards = [synthetic_dir(workdir) / f for f in listed]  # index.json is authoritative
        gone = [str(p) for p in shards if not p.is_file()]
        if gone:
            raise UserError(f"shards listed in index.json are missing: {', '.join(gone[:5])}; re-run `medsynth synthesize`")
    else:
        shards = shard_paths(workdir)
    if not shards:
        raise _missing(workdir, "no synth-*.tar shards")
    samples: list[SynthSample] = []
    for shard in shards:
        groups: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    name = m.name.rsplit("/", 1)[-1]
                    if "." not in name:
                        continue
                    key, ext = name.split(".", 1)  # webdataset's convention: key up to the first dot
                    g = groups.setdefault(key, {})
                    if ext.lower() in IMAGE_EXTS:
                        g["image"] = (m.offset_data, m.size)
                    elif ext in ("cls", "json"):
                        g[ext] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"{shard}: cannot read the shard ({e}); delete it and re-run `medsynth synthesize`") from None
        for key, g in groups.items():
            if "image" not in g or "cls" not in g:
                raise UserError(f"{shard}: sample {key!r} lacks a png/jpg image or a cls label; re-run `medsynth synthesize`")
            try:
                label = int(g["cls"].decode("utf-8").strip())
            except ValueError:
                raise UserError(f"{shard}: sample {key!r} has label {g['cls'][:20]!r}; expected an integer class index") from None
            if not 0 <= label < len(class_names):
                raise UserError(f"{shard}: sample {key!r} has label {label}, outside 0..{len(class_names) - 1} "
                                f"({len(class_names)} classes in this workspace)")
            meta = json.loads(g["json"]) if "json" in g else {}
            name = meta.get("label") if isinstance(meta, dict) else None
            if isinstance(name, str) and name != class_names[label]:
                raise UserError(f"{shard}: sample {key!r} has cls {label} ({class_names[label]!r}) but its json says label {name!r}")
            off, size = g["image"]
            samples.append(SynthSample(key, str(shard), off, size, label, meta if isinstance(meta, dict) else {}))
    return samples


def read_image(sample: SynthSample) -> Image.Image:
    """Decode one synthetic image (RGB) by seeking into its shard."""
    with open(sample.shard, "rb") as fh:
        fh.seek(sample.offset)
        data = fh.read(sample.size)
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")
