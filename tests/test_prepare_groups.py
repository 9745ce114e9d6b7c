"""Grouped splits (data.group_by): no group (lesion, patient, video) is split between train and test."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from medsynth.errors import UserError

HAM_CLASSES = ["actinic-keratosis", "basal-cell-carcinoma", "benign-keratosis", "dermatofibroma",
               "melanocytic-nevus", "melanoma", "vascular-lesion"]


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _prepare(*sets: str):
    from medsynth import data
    from medsynth.recipe import load_recipe

    r = load_recipe("demo", list(sets))
    data.run(r)
    return r


def _link_images(shared_data: Path, dest: Path, per_class: dict[str, int]) -> dict[str, list[Path]]:
    """A tmp class-folder tree of symlinks to real HAM10000 images."""
    out = {}
    for c, n in per_class.items():
        (dest / c).mkdir(parents=True)
        out[c] = []
        for src in sorted((shared_data / "ham10000" / c).glob("*.jpg"))[:n]:
            (dest / c / src.name).symlink_to(src)
            out[c].append(dest / c / src.name)
    return out


def test_ham10000_split_by_lesion_keeps_lesions_whole_and_classes_stratified(cli, shared_data, tmp_path):
    root = shared_data / "ham10000"
    lesion = {(root / x["file"]).resolve().as_posix(): x["lesion_id"] for x in _rows(root / "labels.csv")}
    ws = tmp_path / "ws"
    args = ("prepare", "skin", "--set", f"data.root={root}", "--set", "classes=[" + ", ".join(HAM_CLASSES) + "]",
            "--set", "data.group_by=lesion_id", "--set", f"workdir={ws}", "--json")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    rows = _rows(ws / "manifest.csv")
    assert len(rows) == 728 and list(rows[0]) == ["path", "label", "split", "sha256", "width", "height", "group"]
    assert all(x["group"] == lesion[x["path"]] for x in rows)  # the manifest records each image's lesion
    splits_of = defaultdict(set)
    for x in rows:
        splits_of[x["group"]].add(x["split"])
    assert not [g for g, s in splits_of.items() if len(s) > 1]  # no lesion in both train and test
    size = Counter(lesion.values())
    assert sum(1 for x in rows if size[x["group"]] > 1) == 67  # the multi-image lesions are all in
    for c in HAM_CLASSES:
        mine = [x for x in rows if x["label"] == c]
        frac = sum(x["split"] == "test" for x in mine) / len(mine)
        assert abs(frac - 0.2) <= 0.05, (c, frac)

    # Reported on stderr, in --json and in the provenance: groups and images per split.
    out = json.loads(r.stdout)
    g = out["groups"]
    n_test = sum(x["split"] == "test" for x in rows)
    assert g["by"] == "lesion_id" and g["n_groups"] == 691 == len(splits_of) and g["mixed_label_groups"] == 0
    assert g["test"] == {"groups": sum(s == {"test"} for s in splits_of.values()), "images": n_test}
    assert g["train"]["groups"] + g["test"]["groups"] == 691 and g["train"]["images"] == 728 - n_test
    assert f"split by lesion_id: 691 groups; train {g['train']['groups']} groups / {728 - n_test} images" in r.stderr
    assert json.loads((ws / "prepare" / "provenance.json").read_text())["groups"] == g

    from medsynth.data import read_manifest

    assert {x.group for x in read_manifest(ws, "test")} == {gid for gid, s in splits_of.items() if s == {"test"}}

    # Deterministic for a seed, another split for another seed.
    before = (ws / "manifest.csv").read_bytes()
    assert cli(*args).returncode == 0 and (ws / "manifest.csv").read_bytes() == before
    assert cli(*args, "--set", "seed=5").returncode == 0 and (ws / "manifest.csv").read_bytes() != before


def test_groups_csv_beside_the_class_folders(shared_data, tmp_path):
    root = tmp_path / "data"
    files = _link_images(shared_data, root, {"melanoma": 8, "dermatofibroma": 6})
    sets = [f"data.root={root}", f"workdir={tmp_path / 'ws'}", "data.group_by=patient"]

    # No CSV at all: the error names both accepted files and both path columns.
    with pytest.raises(UserError) as e:
        _prepare(*sets)
    msg = str(e.value)
    assert "groups.csv" in msg and "labels.csv" in msg and "'path' or 'file'" in msg and "remove data.group_by" in msg
    # labels.csv without the column: named, with the columns it has.
    (root / "labels.csv").write_text("file,class\n" + "".join(f"{p.relative_to(root)},{c}\n" for c, ps in files.items() for p in ps))
    with pytest.raises(UserError, match=r"labels.csv has columns \['file', 'class'\]; it needs a 'path' or 'file' column .*'patient'"):
        _prepare(*sets)
    # groups.csv (path column) wins over labels.csv; pairs of melanoma images share a patient.
    lines = ["path,patient"] + [f"{p.relative_to(root)},mel-{i // 2}" for i, p in enumerate(files["melanoma"])]
    lines += [f"{p.relative_to(root)},df-{i}" for i, p in enumerate(files["dermatofibroma"][:-1])]
    (root / "groups.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:  # one image has no group id: named, with the fix
        _prepare(*sets)
    assert "1 image(s) have no group id" in str(e.value) and files["dermatofibroma"][-1].name in str(e.value)
    assert "groups.csv" in str(e.value)
    (root / "groups.csv").write_text("\n".join(lines + [f"{files['dermatofibroma'][-1].relative_to(root)},df-5"]) + "\n")
    r = _prepare(*sets)
    rows = _rows(r.workdir_path / "manifest.csv")
    by_group = defaultdict(set)
    for x in rows:
        by_group[x["group"]].add(x["split"])
    assert len(by_group) == 4 + 6 and all(len(s) == 1 for s in by_group.values())
    assert Counter((x["label"], x["split"]) for x in rows) == {("melanoma", "train"): 6, ("melanoma", "test"): 2,
                                                               ("dermatofibroma", "train"): 5, ("dermatofibroma", "test"): 1}


def test_csv_manifest_groups_mixed_labels_given_split_and_unsplittable_class(shared_data, tmp_path):
    src = {c: sorted((shared_data / "ham10000" / c).glob("*.jpg")) for c in ("melanoma", "melanocytic-nevus")}
    csv_path = tmp_path / "list.csv"
    ws = tmp_path / "ws"

    def write(rows):
        csv_path.write_text("path,label,Patient\n" + "".join(f"{p},{lab},{g}\n" for p, lab, g in rows))

    # Patient P0 has a melanoma and a nevus: the group stays whole, in one split, counted for both classes.
    rows = [(src["melanoma"][i], "melanoma", f"P{i}") for i in range(10)]
    rows += [(src["melanocytic-nevus"][0], "melanocytic-nevus", "P0")]
    rows += [(src["melanocytic-nevus"][i], "melanocytic-nevus", f"N{i}") for i in range(1, 10)]
    write(rows)
    r = _prepare(f"data.manifest={csv_path}", f"workdir={ws}", "data.group_by=patient")
    got = {Path(x["path"]).name: (x["split"], x["group"]) for x in _rows(ws / "manifest.csv")}
    assert got[src["melanoma"][0].name][0] == got[src["melanocytic-nevus"][0].name][0]
    prov = json.loads((r.workdir_path / "prepare" / "provenance.json").read_text())
    assert prov["groups"]["mixed_label_groups"] == 1 and prov["groups"]["n_groups"] == 19
    for c in ("melanoma", "melanocytic-nevus"):  # target 2 of 10 each; the shared patient may add one
        assert 2 <= sum(1 for x in _rows(ws / "manifest.csv") if x["label"] == c and x["split"] == "test") <= 3

    # A missing group id is an error naming the file; so is a missing column.
    write(rows[:-1] + [(rows[-1][0], rows[-1][1], "")])
    with pytest.raises(UserError, match=f"(?s)1 image\\(s\\) have no group id .*{rows[-1][0].name}"):
        _prepare(f"data.manifest={csv_path}", f"workdir={ws}", "data.group_by=patient")
    with pytest.raises(UserError, match="has no column 'lesion'"):
        _prepare(f"data.manifest={csv_path}", f"workdir={ws}", "data.group_by=lesion")

    # A class whose images are all one patient cannot be split without splitting the patient.
    write([(p, "melanoma", "P-same") for p in src["melanoma"][:4]] + rows[10:])
    with pytest.raises(UserError, match="class 'melanoma': its 4 image\\(s\\) lie in 1 patient group\\(s\\)"):
        _prepare(f"data.manifest={csv_path}", f"workdir={ws}", "data.group_by=patient")

    # A given split column is kept, but a group in both splits is an error naming the group.
    csv_path.write_text("path,label,split,patient\n" + "".join(
        f"{p},melanoma,{'test' if i in (0, 3) else 'train'},{'P-A' if i < 2 else f'P{i}'}\n" for i, p in enumerate(src["melanoma"][:6])))
    with pytest.raises(UserError, match="puts 1 patient group\\(s\\) in both train and test \\('P-A'\\)"):
        _prepare(f"data.manifest={csv_path}", f"workdir={ws}", "data.group_by=patient")


def test_grouped_split_is_per_class_stable_and_old_manifests_still_read(shared_data, tmp_path):
    """Adding a class does not move another class's groups; manifests without a group column still read."""
    from medsynth.data import read_manifest

    root = tmp_path / "data"
    files = _link_images(shared_data, root, {"melanoma": 12, "dermatofibroma": 9, "vascular-lesion": 9})
    (root / "groups.csv").write_text("path,lesion\n" + "".join(
        f"{p.relative_to(root)},{c}-{i // 3}\n" for c, ps in files.items() for i, p in enumerate(ps)))
    base = [f"data.root={root}", "data.group_by=lesion"]
    _prepare(*base, f"workdir={tmp_path / 'a'}", "classes=[melanoma, dermatofibroma]")
    _prepare(*base, f"workdir={tmp_path / 'b'}")
    a = {x.path: x.split for x in read_manifest(tmp_path / "a")}
    b = {x.path: x.split for x in read_manifest(tmp_path / "b") if x.path in a}
    assert a == b

    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.csv").write_text("path,label,split,sha256,width,height\n/x/a.png,a,train,0,1,1\n")
    (row,) = read_manifest(old)
    assert row.group is None and (row.path, row.split, row.width) == ("/x/a.png", "train", 1)
