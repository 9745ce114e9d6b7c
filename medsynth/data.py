"""The prepare stage: scan an image folder or a CSV manifest, verify, split, write the manifest.

Outputs (in ``recipe.workdir``):
- ``manifest.csv``: path,label,split,sha256,width,height; rows ordered by class order, then path;
  the same inputs and seed give a byte-identical file.
- ``classes.json``: class order (= integer label), category text, folder, counts per split.
- ``prepare/``: config.yaml, provenance.json and, with ``data.on_bad_image: skip``, bad_images.csv.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import console
from .errors import UserError
from .images import BadImage, read_image
from .recipe import CLASS_NAME_RE, ClassSpec, Recipe, to_dict
from .workspace import atomic_write_json, atomic_write_text, ensure_dir, sha256_file, write_provenance

MANIFEST_COLUMNS = ("path", "label", "split", "sha256", "width", "height")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Row:
    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int


# ----------------------------------------------------------------------------- reading back


def manifest_path(workdir: Path) -> Path:
    return Path(workdir) / "manifest.csv"


def read_manifest(workdir: str | os.PathLike, split: str | None = None) -> list[Row]:
    """Rows of ``<workdir>/manifest.csv`` (optionally one split); clear error when missing."""
    path = manifest_path(Path(workdir))
    if not path.is_file():
        raise UserError(f"{path} not found: run `medsynth prepare` with this recipe first")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [Row(r["path"], r["label"], r["split"], r["sha256"], int(r["width"]), int(r["height"]))
                for r in csv.DictReader(fh)]
    return [r for r in rows if split is None or r.split == split]


def read_classes(workdir: str | os.PathLike) -> list[dict]:
    """Classes in label order: dicts with index, name, category, folder, n_train, n_test."""
    path = Path(workdir) / "classes.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `medsynth prepare` with this recipe first")
    return json.loads(path.read_text())["classes"]


# ----------------------------------------------------------------------------- scanning


def _scan_folder(recipe: Recipe) -> tuple[list[ClassSpec], list[tuple[Path, str, str | None]]]:
    root = Path(recipe.data.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a directory; point it at a folder with one sub-folder per class (--set data.root=DIR)")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in recipe.data.extensions}
    if recipe.classes is None:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"data.root: {root} has no class sub-folders; put each class's images in root/<class>/")
        bad = [f for f in folders if not _valid_name(f)]
        if bad:
            raise UserError(f"data.root: folder name(s) {', '.join(repr(b) for b in bad)} cannot be class names (letters, digits, '-', '_' only); rename them or list 'classes' with name/folder/category in the recipe")
        classes = [ClassSpec(name=f) for f in folders]
    else:
        classes = list(recipe.classes)
        missing = [c for c in classes if not (root / c.resolved_folder()).is_dir()]
        if missing:
            have = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise UserError(
                f"classes: no folder for {', '.join(repr(c.resolved_folder()) for c in missing)} under {root} "
                f"(folders there: {', '.join(have) or 'none'}); fix the class list or set each class's 'folder'"
            )
    items = []
    for c in classes:
        folder = root / c.resolved_folder()
        for p in sorted(folder.rglob("*")):
            # Hidden files and folders (.ipynb_checkpoints, ._x.jpg resource forks) are not data.
            hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
            if p.is_file() and p.suffix.lower() in exts and not hidden:
                items.append((p.resolve(), c.name, None))
    return classes, items


def _valid_name(name: str) -> bool:
    return bool(CLASS_NAME_RE.match(name))


def _scan_csv(recipe: Recipe) -> tuple[list[ClassSpec], list[tuple[Path, str, str | None]]]:
    path = Path(recipe.data.manifest).expanduser()
    if not path.is_file():
        raise UserError(f"data.manifest: {path} not found; give a CSV with columns path,label[,split]")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise UserError(f"data.manifest: {path} has columns {cols}; it needs a header with 'path' and 'label' (and optionally 'split')")
        raw_rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    problems, items = [], []
    for i, r in enumerate(raw_rows, start=2):
        split = r.get("split") or None
        if split is not None and split not in SPLITS:
            problems.append(f"{path}:{i}: split {split!r} is not 'train' or 'test'")
        if not r.get("path") or not r.get("label"):
            problems.append(f"{path}:{i}: empty path or label")
            continue
        p = Path(r["path"]).expanduser()
        if not p.is_absolute():
            p = path.parent / p
        items.append((p.resolve(), r["label"], split))
    if problems:
        raise UserError("data.manifest has problems:\n  - " + "\n  - ".join(problems[:50]))
    splits_given = {s for _, _, s in items}
    if None in splits_given and len(splits_given) > 1:
        raise UserError(f"data.manifest: {path} gives a split for some rows but not others; fill the 'split' column for every row or remove it")
    labels = sorted({lab for _, lab, _ in items})
    if recipe.classes is None:
        bad = [x for x in labels if not _valid_name(x)]
        if bad:
            raise UserError(f"data.manifest: label(s) {', '.join(repr(b) for b in bad)} cannot be class names (letters, digits, '-', '_'); list 'classes' with name/category in the recipe and use those names as labels")
        classes = [ClassSpec(name=x) for x in labels]
    else:
        classes = list(recipe.classes)
        known = {c.name for c in classes}
        unknown = sorted(set(labels) - known)
        if unknown:
            raise UserError(f"data.manifest: label(s) {', '.join(repr(u) for u in unknown)} are not in the recipe's classes ({', '.join(sorted(known))}); fix the labels or the class list")
    return classes, items


# ----------------------------------------------------------------------------- verification


def _inspect(path: Path) -> tuple[Path, str | None, str, int, int]:
    """(path, error or None, sha256, width, height) after a full decode."""
    try:
        if not path.is_file():
            return path, "does not exist", "", 0, 0
        img = read_image(path)
        return path, None, sha256_file(path), img.width, img.height
    except BadImage as e:
        return path, str(e), "", 0, 0
    except OSError as e:
        return path, f"cannot be read ({e.strerror or e})", "", 0, 0


def _split_class(n: int, test_fraction: float) -> int:
    """Number of test images for a class of n (n >= 2): at least 1, and at most as many as train images."""
    # At least one test image, and never more test than train images (n // 2 caps the rounding up
    # of e.g. 3 * 0.5): a class's classifier metrics rest on its test images, its synthesis on its train ones.
    return min(max(1, round(n * test_fraction)), n // 2)


def run(recipe: Recipe) -> Path:
    """Scan, verify and split the data; write manifest.csv + classes.json. Returns the manifest path."""
    if recipe.data.root is None and recipe.data.manifest is None:
        raise UserError(f"{recipe.source}: data.root is not set; point it at a folder with one sub-folder per class (--set data.root=DIR) or give data.manifest")
    classes, items = _scan_csv(recipe) if recipe.data.manifest else _scan_folder(recipe)
    workdir = ensure_dir(recipe.workdir_path)

    console.info(f"prepare: checking {len(items)} images in {len(classes)} classes")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(console.progress(pool.map(_inspect, [p for p, _, _ in items]), total=len(items), desc="decode"))
    bad = [(p, err) for p, err, *_ in results if err]
    if bad and recipe.data.on_bad_image == "error":
        lines = "\n".join(f"  - {p}: {err}" for p, err in bad)
        raise UserError(
            f"{len(bad)} image(s) cannot be used:\n{lines}\n"
            "Fix or remove them, or set data.on_bad_image: skip to leave them out (they are then listed in prepare/bad_images.csv)."
        )
    info = {p: (sha, w, h) for p, err, sha, w, h in results if not err}

    by_class: dict[str, list[tuple[Path, str | None]]] = defaultdict(list)
    for p, label, split in items:
        if p in info:
            by_class[label].append((p, split))

    rows: list[Row] = []
    problems = []
    for c in classes:
        members = sorted(by_class.get(c.name, []), key=lambda t: str(t[0]))
        n = len(members)
        if n < recipe.data.min_per_class:
            problems.append(f"class {c.name!r} has {n} usable image(s); it needs at least {recipe.data.min_per_class} to split into train and test (add images, merge the class, or drop it from 'classes')")
            continue
        if all(s is not None for _, s in members):
            assigned = [(p, s) for p, s in members]
            if not any(s == "train" for _, s in assigned) or not any(s == "test" for _, s in assigned):
                problems.append(f"class {c.name!r}: the manifest's split column leaves it without a train or a test image")
        else:
            order = list(range(n))
            # One RNG per class, seeded by (seed, class name): adding a class does not reshuffle others.
            random.Random(f"{recipe.seed}:{c.name}").shuffle(order)
            test_idx = set(order[: _split_class(n, recipe.data.test_fraction)])
            assigned = [(p, "test" if i in test_idx else "train") for i, (p, _) in enumerate(members)]
        for p, s in assigned:
            sha, w, h = info[p]
            rows.append(Row(p.as_posix(), c.name, s, sha, w, h))
    if problems:
        raise UserError("cannot split the data:\n  - " + "\n  - ".join(problems))

    dup = Counter(r.sha256 for r in rows)
    n_dup = sum(v - 1 for v in dup.values() if v > 1)
    if n_dup:
        console.warn(f"{n_dup} image(s) are byte-identical copies of another image; copies may land in both train and test")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for r in rows:
        w.writerow([r.path, r.label, r.split, r.sha256, r.width, r.height])
    manifest = atomic_write_text(manifest_path(workdir), buf.getvalue())

    counts = {c.name: Counter(r.split for r in rows if r.label == c.name) for c in classes}
    classes_doc = {"classes": [
        {"index": i, "name": c.name, "category": c.resolved_category(), "folder": c.resolved_folder(),
         "n_train": counts[c.name]["train"], "n_test": counts[c.name]["test"]}
        for i, c in enumerate(classes)
    ]}
    atomic_write_json(workdir / "classes.json", classes_doc)

    stage_dir = ensure_dir(workdir / "prepare")
    bad_csv = stage_dir / "bad_images.csv"
    if bad:
        b = io.StringIO()
        bw = csv.writer(b, lineterminator="\n")
        bw.writerow(["path", "reason"])
        for p, err in bad:
            bw.writerow([p.as_posix(), err])
        atomic_write_text(bad_csv, b.getvalue())
        console.warn(f"skipped {len(bad)} unreadable image(s); listed in {bad_csv}")
    elif bad_csv.exists():
        bad_csv.unlink()
    write_provenance(stage_dir, recipe, "prepare",
                     inputs={"manifest.csv": sha256_file(manifest)},
                     config={"data": to_dict(recipe.data), "classes": classes_doc, "seed": recipe.seed},
                     extra={"n_images": len(rows), "n_bad": len(bad)})
    n_train = sum(1 for r in rows if r.split == "train")
    console.info(f"prepare: {len(rows)} images ({n_train} train / {len(rows) - n_train} test) -> {manifest}")
    return manifest


def summary(workdir: Path) -> dict:
    """Counts per class and split, for --json output."""
    classes = read_classes(workdir)
    bad_csv = Path(workdir) / "prepare" / "bad_images.csv"
    n_bad = max(0, len(bad_csv.read_text().splitlines()) - 1) if bad_csv.is_file() else 0
    return {
        "manifest": str(manifest_path(Path(workdir))),
        "classes": {c["name"]: {"train": c["n_train"], "test": c["n_test"]} for c in classes},
        "n_train": sum(c["n_train"] for c in classes),
        "n_test": sum(c["n_test"] for c in classes),
        "skipped": n_bad,
    }
