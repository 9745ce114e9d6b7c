"""The prepare stage: scan an image folder or a CSV manifest, verify, split, write the manifest.

Outputs (in ``recipe.workdir``, a marked workspace, see :mod:`medsynth.workspace`):
- ``manifest.csv``: path,label,split,sha256,width,height (+ group with ``data.group_by``); rows
  ordered by class order, then path; the same inputs and seed give a byte-identical file.
- ``classes.json``: class order (= integer label), category text, folder, counts per split.
- ``prepare/``: config.yaml, provenance.json and, with ``data.on_bad_image: skip``, bad_images.csv.
"""

from __future__ import annotations

import csv
import hashlib
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
from .workspace import (STAGE_DIRS, atomic_write_json, atomic_write_text, check_workdir, claim, ensure_dir,
                        is_legacy_workspace, is_workspace, read_provenance, sha256_file, write_provenance)

MANIFEST_COLUMNS = ("path", "label", "split", "sha256", "width", "height")
# Written as a 7th column only with data.group_by, so manifests without groups stay as they were.
GROUP_COLUMN = "group"
SPLITS = ("train", "test")
# Beside a class-folder tree, the CSV that data.group_by reads its column from (the first that exists).
GROUP_FILES = ("groups.csv", "labels.csv")
GROUP_PATH_COLUMNS = ("path", "file")

# (absolute image path, label, split given by a CSV manifest or None, group id or None)
Item = tuple[Path, str, str | None, str | None]


@dataclass(frozen=True)
class Row:
    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int
    group: str | None = None  # the data.group_by id; None when the manifest has no group column


# ----------------------------------------------------------------------------- reading back


def manifest_path(workdir: Path) -> Path:
    return Path(workdir) / "manifest.csv"


def read_manifest(workdir: str | os.PathLike, split: str | None = None) -> list[Row]:
    """Rows of ``<workdir>/manifest.csv`` (optionally one split); clear error when missing."""
    path = manifest_path(Path(workdir))
    if not path.is_file():
        raise UserError(f"{path} not found: run `medsynth prepare` with this recipe first")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [Row(r["path"], r["label"], r["split"], r["sha256"], int(r["width"]), int(r["height"]),
                    r.get(GROUP_COLUMN) or None)
                for r in csv.DictReader(fh)]
    return [r for r in rows if split is None or r.split == split]


def read_classes(workdir: str | os.PathLike) -> list[dict]:
    """Classes in label order: dicts with index, name, category, folder, n_train, n_test."""
    path = Path(workdir) / "classes.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `medsynth prepare` with this recipe first")
    return json.loads(path.read_text())["classes"]


# ----------------------------------------------------------------------------- scanning


def _not_a_class(folder: Path, root_has_outputs: bool, exts: set[str]) -> str | None:
    """Why a sub-folder of data.root is medsynth's own and not a class (None: it may be a class)."""
    if is_workspace(folder):
        return "a medsynth workspace"
    try:
        holds_workspaces = any(is_workspace(sub) for sub in folder.iterdir() if sub.is_dir())
    except OSError:
        return None
    # runs/ with workspaces in it; a class folder with a stray workspace inside keeps its images.
    if holds_workspaces and not _image_files(folder, exts):
        return "a folder of medsynth workspaces"
    # Stage folders only where an older medsynth used the data folder itself as its workdir.
    if root_has_outputs and folder.name in STAGE_DIRS:
        return "a medsynth stage folder"
    return None


def _image_files(folder: Path, exts: set[str]) -> list[Path]:
    """Image files under ``folder``, sorted; hidden entries and medsynth workspaces are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):  # as rglob did
        # Hidden files and folders (.ipynb_checkpoints, ._x.jpg resource forks) are not data; a
        # workspace's sample grids and plots are images but not data either.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not is_workspace(Path(dirpath) / d)]
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and p.suffix.lower() in exts and p.is_file():
                found.append(p)
    return sorted(found)


def _scan_folder(recipe: Recipe) -> tuple[list[ClassSpec], list[Item]]:
    root = Path(recipe.data.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a directory; point it at a folder with one sub-folder per class (--set data.root=DIR)")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in recipe.data.extensions}
    if recipe.classes is None:
        root_has_outputs = is_workspace(root) or is_legacy_workspace(root)
        folders, skipped = [], []
        for p in sorted(root.iterdir()):
            if not p.is_dir() or p.name.startswith("."):
                continue
            why = _not_a_class(p, root_has_outputs, exts)
            if why:
                skipped.append(f"{p.name}/ ({why})")
            else:
                folders.append(p.name)
        if skipped:
            console.warn(f"data.root: {', '.join(skipped)} left out of the classes; keep workspaces outside the data folder")
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
        for p in _image_files(root / c.resolved_folder(), exts):
            items.append((p.resolve(), c.name, None, None))
    if recipe.data.group_by:
        groups, source = _read_group_file(root, recipe.data.group_by)
        items = [(p, lab, s, groups.get(p)) for p, lab, s, _ in items]
        _check_groups_given(items, f"{source} (column {recipe.data.group_by!r})", root)
    return classes, items


def _read_group_file(root: Path, group_by: str) -> tuple[dict[Path, str], Path]:
    """Group id per image from groups.csv (else labels.csv) beside the class folders of data.root."""
    col = group_by.strip().lower()
    path = next((root / n for n in GROUP_FILES if (root / n).is_file()), None)
    need = (f"a CSV {root / GROUP_FILES[0]} (or {GROUP_FILES[1]}) with a 'path' or 'file' column (the image path "
            f"relative to {root}) and a {col!r} column")
    if path is None:
        raise UserError(f"data.group_by is {group_by!r} but {root} has neither {' nor '.join(GROUP_FILES)}; "
                        f"add {need}, or remove data.group_by")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        raw = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    pcol = next((c for c in GROUP_PATH_COLUMNS if c in cols), None)
    if pcol is None or col not in cols:
        raise UserError(f"data.group_by: {path} has columns {cols}; it needs a 'path' or 'file' column (image path "
                        f"relative to {root}) and a {col!r} column; add them, or set data.group_by to one of its columns")
    groups: dict[Path, str] = {}
    for r in raw:
        if r.get(pcol) and r.get(col):
            p = Path(r[pcol]).expanduser()
            groups[(p if p.is_absolute() else root / p).resolve()] = r[col]
    return groups, path


def _check_groups_given(items: list[Item], where: str, fix_in: Path) -> None:
    """An image without a group id is an error: silently making it a group of its own could leak."""
    missing = [p for p, _, _, g in items if not g]
    if missing:
        listed = "\n".join(f"  - {p}" for p in missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise UserError(
            f"data.group_by: {len(missing)} image(s) have no group id in {where}:\n{listed}\n"
            f"Give every image a group id in {fix_in} (an image that shares its group with no other can get an id of "
            f"its own, e.g. its file name), or remove data.group_by."
        )


def _valid_name(name: str) -> bool:
    return bool(CLASS_NAME_RE.match(name))


def _scan_csv(recipe: Recipe) -> tuple[list[ClassSpec], list[Item]]:
    path = Path(recipe.data.manifest).expanduser()
    if not path.is_file():
        raise UserError(f"data.manifest: {path} not found; give a CSV with columns path,label[,split]")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise UserError(f"data.manifest: {path} has columns {cols}; it needs a header with 'path' and 'label' (and optionally 'split')")
        raw_rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    group_col = recipe.data.group_by.strip().lower() if recipe.data.group_by else None
    if group_col and group_col not in cols:
        raise UserError(f"data.group_by: {path} has no column {group_col!r} (its columns: {cols}); add the column "
                        f"with each image's group id, or set data.group_by to one of its columns")
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
        items.append((p.resolve(), r["label"], split, r.get(group_col) if group_col else None))
    if problems:
        raise UserError("data.manifest has problems:\n  - " + "\n  - ".join(problems[:50]))
    if group_col:
        _check_groups_given(items, f"{path} (column {group_col!r})", path)
    splits_given = {s for _, _, s, _ in items}
    if None in splits_given and len(splits_given) > 1:
        raise UserError(f"data.manifest: {path} gives a split for some rows but not others; fill the 'split' column for every row or remove it")
    labels = sorted({lab for _, lab, _, _ in items})
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


def _group_order_key(seed: int, group: str) -> str:
    # Each group's place in the order depends on (seed, group id) alone, so adding a class (its
    # groups) leaves the relative order, and so the split, of the other classes' groups unchanged.
    return hashlib.sha256(f"{seed}:{group}".encode("utf-8")).hexdigest()


def _grouped_split(members: dict[str, list[tuple[Path, str]]], test_fraction: float, seed: int,
                   group_by: str) -> tuple[dict[str, str], list[str]]:
    """Split whole groups: returns (split per group id, problems).

    ``members`` maps a group id to its (path, label) images. Each class aims at the same test count
    as an ungrouped split (``_split_class``). Groups are visited in a seeded order; a group goes to
    test when that brings its classes' test counts closer to their targets (squared error), so a
    group with images of several classes counts towards each of them. Then a class left without
    test (or train) images gets its smallest group that can move without emptying another class's
    split; a class whose images cannot be split that way is a problem.
    """
    n_class = Counter(lab for imgs in members.values() for _, lab in imgs)
    target = {c: _split_class(n, test_fraction) for c, n in n_class.items()}
    comp = {g: Counter(lab for _, lab in imgs) for g, imgs in members.items()}
    order = sorted(members, key=lambda g: (_group_order_key(seed, g), g))
    test = Counter()
    split = {}
    for g in order:
        delta = sum((test[c] + k - target[c]) ** 2 - (test[c] - target[c]) ** 2 for c, k in comp[g].items())
        split[g] = "test" if delta < 0 else "train"
        if split[g] == "test":
            test.update(comp[g])

    def have(which: str, c: str) -> int:
        return test[c] if which == "test" else n_class[c] - test[c]

    problems = []
    for c in sorted(n_class):
        for need, other in (("test", "train"), ("train", "test")):
            if have(need, c) > 0:
                continue
            movable = [g for g in order if split[g] == other and c in comp[g]
                       and all(have(other, x) - k > 0 for x, k in comp[g].items())]
            if not movable:
                problems.append(
                    f"class {c!r}: its {n_class[c]} image(s) lie in {sum(1 for g in comp if c in comp[g])} "
                    f"{group_by} group(s) that cannot be split into train and test without splitting a group; "
                    f"add images of other groups to the class, check the {group_by!r} ids, or remove data.group_by")
                continue
            # The smallest group disturbs the other classes' fractions least.
            g = min(movable, key=lambda x: sum(comp[x].values()))
            split[g] = need
            if need == "test":
                test.update(comp[g])
            else:
                test.subtract(comp[g])
    return split, problems


def _groups_report(rows: list[Row], group_by: str, members: dict[str, list[tuple[Path, str]]]) -> dict:
    out: dict = {"by": group_by, "n_groups": len({r.group for r in rows}),
                 "mixed_label_groups": sum(1 for imgs in members.values() if len({lab for _, lab in imgs}) > 1)}
    for s in SPLITS:
        mine = [r for r in rows if r.split == s]
        out[s] = {"groups": len({r.group for r in mine}), "images": len(mine)}
    return out


def run(recipe: Recipe) -> Path:
    """Scan, verify and split the data; write manifest.csv + classes.json. Returns the manifest path."""
    if recipe.data.root is None and recipe.data.manifest is None:
        raise UserError(f"{recipe.source}: data.root is not set; point it at a folder with one sub-folder per class (--set data.root=DIR) or give data.manifest")
    # Before the data is even scanned: a workdir that is the data folder would make the scan itself
    # misleading (medsynth's folders there look like classes), and nothing may be written into it.
    check_workdir(recipe)
    classes, items = _scan_csv(recipe) if recipe.data.manifest else _scan_folder(recipe)
    group_by = recipe.data.group_by or None

    console.info(f"prepare: checking {len(items)} images in {len(classes)} classes")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(console.progress(pool.map(_inspect, [p for p, *_ in items]), total=len(items), desc="decode"))
    bad = [(p, err) for p, err, *_ in results if err]
    if bad and recipe.data.on_bad_image == "error":
        lines = "\n".join(f"  - {p}: {err}" for p, err in bad)
        raise UserError(
            f"{len(bad)} image(s) cannot be used:\n{lines}\n"
            "Fix or remove them, or set data.on_bad_image: skip to leave them out (they are then listed in prepare/bad_images.csv)."
        )
    info = {p: (sha, w, h) for p, err, sha, w, h in results if not err}

    by_class: dict[str, list[tuple[Path, str | None]]] = defaultdict(list)
    group_of: dict[Path, str] = {}
    for p, label, split, group in items:
        if p in info:
            by_class[label].append((p, split))
            if group is not None:
                group_of[p] = group
    group_members: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for label, imgs in by_class.items():
        for p, _ in imgs:
            if group_by:
                group_members[group_of[p]].append((p, label))

    rows: list[Row] = []
    problems = []
    group_split: dict[str, str] = {}
    given = any(s is not None for imgs in by_class.values() for _, s in imgs)
    if group_by and not given:
        # Only classes that are big enough take part; the others are reported below.
        ok = {c.name for c in classes if len(by_class.get(c.name, [])) >= recipe.data.min_per_class}
        group_split, problems = _grouped_split(
            {g: imgs for g, imgs in group_members.items() if all(lab in ok for _, lab in imgs)},
            recipe.data.test_fraction, recipe.seed, group_by)
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
        elif group_by:
            if not all(group_of[p] in group_split for p, _ in members):
                continue  # the group also holds images of a class that is too small: reported there
            assigned = [(p, group_split[group_of[p]]) for p, _ in members]
        else:
            order = list(range(n))
            # One RNG per class, seeded by (seed, class name): adding a class does not reshuffle others.
            random.Random(f"{recipe.seed}:{c.name}").shuffle(order)
            test_idx = set(order[: _split_class(n, recipe.data.test_fraction)])
            assigned = [(p, "test" if i in test_idx else "train") for i, (p, _) in enumerate(members)]
        for p, s in assigned:
            sha, w, h = info[p]
            rows.append(Row(p.as_posix(), c.name, s, sha, w, h, group_of.get(p) if group_by else None))
    if group_by and given:
        splits_of: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            splits_of[r.group].add(r.split)
        spans = sorted(g for g, ss in splits_of.items() if len(ss) > 1)
        if spans:
            problems.append(
                f"the manifest's split column puts {len(spans)} {group_by} group(s) in both train and test "
                f"({', '.join(repr(g) for g in spans[:10])}{', ...' if len(spans) > 10 else ''}); put each group's "
                f"images in one split, or leave the split column out and let prepare split by group")
    if problems:
        raise UserError("cannot split the data:\n  - " + "\n  - ".join(problems))

    dup = Counter(r.sha256 for r in rows)
    n_dup = sum(v - 1 for v in dup.values() if v > 1)
    if n_dup:
        console.warn(f"{n_dup} image(s) are byte-identical copies of another image; copies may land in both train and test")

    groups_doc = _groups_report(rows, group_by, group_members) if group_by else None
    if groups_doc:
        console.info(f"prepare: split by {group_by}: {groups_doc['n_groups']} groups; "
                     + ", ".join(f"{s} {groups_doc[s]['groups']} groups / {groups_doc[s]['images']} images" for s in SPLITS)
                     + (f"; {groups_doc['mixed_label_groups']} group(s) hold several classes and stay whole"
                        if groups_doc["mixed_label_groups"] else ""))

    # Everything is checked: only now is the workdir created (or adopted) and marked.
    workdir = claim(recipe)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS + ((GROUP_COLUMN,) if group_by else ()))
    for r in rows:
        w.writerow([r.path, r.label, r.split, r.sha256, r.width, r.height] + ([r.group] if group_by else []))
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
                     extra={"n_images": len(rows), "n_bad": len(bad), **({"groups": groups_doc} if groups_doc else {})})
    n_train = sum(1 for r in rows if r.split == "train")
    console.info(f"prepare: {len(rows)} images ({n_train} train / {len(rows) - n_train} test) -> {manifest}")
    return manifest


def summary(workdir: Path) -> dict:
    """Counts per class and split, for --json output."""
    classes = read_classes(workdir)
    bad_csv = Path(workdir) / "prepare" / "bad_images.csv"
    n_bad = max(0, len(bad_csv.read_text().splitlines()) - 1) if bad_csv.is_file() else 0
    prov = read_provenance(Path(workdir) / "prepare")
    return {
        "manifest": str(manifest_path(Path(workdir))),
        "classes": {c["name"]: {"train": c["n_train"], "test": c["n_test"]} for c in classes},
        "n_train": sum(c["n_train"] for c in classes),
        "n_test": sum(c["n_test"] for c in classes),
        "skipped": n_bad,
        **({"groups": prov["groups"]} if prov and prov.get("groups") else {}),
    }
