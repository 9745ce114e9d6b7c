"""`medsynth prepare` through the real CLI, on the shared HAM10000 subset and small copies of it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from medsynth.data import MANIFEST_COLUMNS
from medsynth.errors import UserError

HAM_CLASSES = ["actinic-keratosis", "basal-cell-carcinoma", "benign-keratosis", "dermatofibroma",
               "melanocytic-nevus", "melanoma", "vascular-lesion"]
SMALL = ["dermatofibroma", "melanoma", "vascular-lesion"]


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _small_root(shared_data: Path, dest: Path, per_class: int = 6, classes=SMALL) -> Path:
    """A tmp data root with a few real HAM10000 images per class (copied: tests may damage them)."""
    for c in classes:
        (dest / c).mkdir(parents=True)
        for src in sorted((shared_data / "ham10000" / c).glob("*.jpg"))[:per_class]:
            shutil.copy(src, dest / c / src.name)
    return dest


def _run_in_process(root, workdir, *overrides):
    """The prepare stage called directly (for error cases; the CLI only adds the exit code)."""
    from medsynth import data
    from medsynth.recipe import load_recipe

    sets = ([f"data.root={root}"] if root is not None else []) + [f"workdir={workdir}", *overrides]
    return data.run(load_recipe("demo", sets))


def _prepare(cli, root: Path, workdir: Path, *extra: str, recipe: str = "demo", **kw):
    return cli("prepare", recipe, "--set", f"data.root={root}", "--set", f"workdir={workdir}", *extra, **kw)


# ----------------------------------------------------------------------------- the real data set


def test_ham10000_split_manifest_and_rerun(cli, shared_data, tmp_path):
    root = shared_data / "ham10000"
    ws = tmp_path / "ws"
    args = ("prepare", "skin", "--set", f"data.root={root}", "--set", "classes=[" + ", ".join(HAM_CLASSES) + "]",
            "--set", f"workdir={ws}", "--json")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    manifest = ws / "manifest.csv"
    assert out["manifest"] == str(manifest) and out["stage"] == "prepare" and out["skipped"] == 0

    with open(manifest, newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == MANIFEST_COLUMNS == ("path", "label", "split", "sha256", "width", "height")
    rows = _rows(manifest)
    sizes = {c: len(list((root / c).glob("*.jpg"))) for c in HAM_CLASSES}
    assert len(rows) == sum(sizes.values())
    for c, n in sizes.items():
        mine = [x for x in rows if x["label"] == c]
        n_test = sum(x["split"] == "test" for x in mine)
        assert len(mine) == n and n_test == round(0.2 * n), (c, n, n_test)
        assert out["classes"][c] == {"train": n - n_test, "test": n_test}
    assert [x["label"] for x in rows] == sorted((x["label"] for x in rows), key=HAM_CLASSES.index)  # class order
    first = rows[0]
    assert Path(first["path"]).is_absolute() and Path(first["path"]).is_file()
    assert len(first["sha256"]) == 64 and (int(first["width"]), int(first["height"])) == (200, 150)
    assert len({x["path"] for x in rows}) == len(rows)

    classes = json.loads((ws / "classes.json").read_text())["classes"]
    assert [c["name"] for c in classes] == HAM_CLASSES and [c["index"] for c in classes] == list(range(7))
    assert classes[0]["category"] == "actinic keratosis"
    prov = json.loads((ws / "prepare" / "provenance.json").read_text())
    assert prov["stage"] == "prepare" and prov["complete"] is True and prov["n_images"] == len(rows)
    assert (ws / "prepare" / "config.yaml").is_file()

    before = manifest.read_bytes()
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert manifest.read_bytes() == before
    # Another seed gives another split of the same images.
    r = cli(*args, "--set", "seed=1")
    assert r.returncode == 0, r.stderr
    assert manifest.read_bytes() != before
    assert sorted(x["path"] for x in _rows(manifest)) == sorted(x["path"] for x in rows)


# ----------------------------------------------------------------------------- bad images


def test_bad_images_all_listed_then_skipped(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "data")
    good = sorted((root / "melanoma").glob("*.jpg"))[0].read_bytes()
    (root / "melanoma" / "zz-truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "vascular-lesion" / "zz-empty.jpg").write_bytes(b"")
    (root / "dermatofibroma" / "zz-text.png").write_text("not an image\n")
    ws = tmp_path / "ws"

    r = _prepare(cli, root, ws)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "3 image(s) cannot be used" in r.stderr
    for name, reason in (("zz-truncated.jpg", "truncated"), ("zz-empty.jpg", "empty file"), ("zz-text.png", "cannot identify")):
        line = next((ln for ln in r.stderr.splitlines() if name in ln), "")
        assert str(root) in line and reason in line, (name, r.stderr)
    assert "data.on_bad_image: skip" in r.stderr
    assert not (ws / "manifest.csv").exists()

    r = _prepare(cli, root, ws, "--set", "data.on_bad_image=skip", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 3
    assert "skipped 3 unreadable image(s)" in r.stderr
    paths = {Path(x["path"]).name for x in _rows(ws / "manifest.csv")}
    assert len(paths) == 18 and not any(p.startswith("zz-") for p in paths)
    bad = _rows(ws / "prepare" / "bad_images.csv")
    assert sorted(Path(b["path"]).name for b in bad) == ["zz-empty.jpg", "zz-text.png", "zz-truncated.jpg"]
    assert all(b["reason"] for b in bad)

    # Once the files are fixed, the record of skipped files goes away.
    for p in root.rglob("zz-*"):
        p.unlink()
    r = _prepare(cli, root, ws, "--set", "data.on_bad_image=skip")
    assert r.returncode == 0, r.stderr
    assert not (ws / "prepare" / "bad_images.csv").exists()


def test_class_too_small_and_empty_class(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "data")
    for p in sorted((root / "melanoma").glob("*.jpg"))[1:]:
        p.unlink()  # one image left: cannot be both train and test
    (root / "empty-class").mkdir()
    r = _prepare(cli, root, tmp_path / "ws")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "class 'melanoma' has 1 usable image(s)" in r.stderr
    assert "class 'empty-class' has 0 usable image(s)" in r.stderr  # both reported at once

    # Listing the classes leaves the empty folder out; the small class is still an error.
    with pytest.raises(UserError) as e:
        _run_in_process(root, tmp_path / "ws", "classes=[dermatofibroma, melanoma]")
    assert "'melanoma'" in str(e.value) and "empty-class" not in str(e.value)
    with pytest.raises(UserError, match="no folder for 'melanom' .*folders there: dermatofibroma, empty-class, melanoma"):
        _run_in_process(root, tmp_path / "ws", "classes=[dermatofibroma, vascular-lesion, melanom]")


def test_class_folders_and_categories(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "data", classes=["dermatofibroma", "melanoma"])
    r = _prepare(cli, root, tmp_path / "ws", "--set",
                 "classes=[{name: df, folder: dermatofibroma, category: a dermatofibroma}, melanoma]", "--json")
    assert r.returncode == 0, r.stderr
    classes = json.loads((tmp_path / "ws" / "classes.json").read_text())["classes"]
    assert [(c["name"], c["folder"], c["category"]) for c in classes] == [
        ("df", "dermatofibroma", "a dermatofibroma"), ("melanoma", "melanoma", "melanoma")]
    assert {x["label"] for x in _rows(tmp_path / "ws" / "manifest.csv")} == {"df", "melanoma"}


def test_bad_folder_name_needs_a_class_list(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "data", classes=["melanoma"])
    shutil.copytree(root / "melanoma", root / "Nevus (benign)")
    r = _prepare(cli, root, tmp_path / "ws")
    assert r.returncode == 1 and "'Nevus (benign)'" in r.stderr and "category" in r.stderr


# ----------------------------------------------------------------------------- CSV manifest input


def test_csv_manifest_without_and_with_split(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "images")
    files = sorted(root.rglob("*.jpg"))
    csv_path = tmp_path / "labels.csv"
    # Relative paths are taken relative to the CSV file.
    csv_path.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in files))
    ws = tmp_path / "ws"
    r = cli("prepare", "demo", "--set", f"data.manifest={csv_path}", "--set", f"workdir={ws}", "--json")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)["classes"]
    assert counts == {c: {"train": 5, "test": 1} for c in sorted(SMALL)}

    # With a split column the given split is kept as is.
    lines = ["path,label,split"]
    for i, p in enumerate(files):
        lines.append(f"{p},{p.parent.name},{'test' if i % 3 == 0 else 'train'}")
    csv_path.write_text("\n".join(lines) + "\n")
    r = cli("prepare", "demo", "--set", f"data.manifest={csv_path}", "--set", f"workdir={ws}", "--json")
    assert r.returncode == 0, r.stderr
    got = {x["path"]: x["split"] for x in _rows(ws / "manifest.csv")}
    assert got == {str(p): ("test" if i % 3 == 0 else "train") for i, p in enumerate(files)}

    # A bad split value is an error naming the row; so is a split given for some rows only.
    csv_path.write_text(f"path,label,split\n{files[0]},melanoma,validation\n{files[1]},melanoma,train\n")
    with pytest.raises(UserError, match=f"{csv_path}:2: split 'validation'"):
        _run_in_process(None, ws, f"data.manifest={csv_path}")
    csv_path.write_text(f"path,label,split\n{files[0]},melanoma,test\n{files[1]},melanoma,\n")
    with pytest.raises(UserError, match="split for some rows but not others"):
        _run_in_process(None, ws, f"data.manifest={csv_path}")
    csv_path.write_text(f"path,label\n{files[0]},Melanoma (bad)\n")
    with pytest.raises(UserError, match="'Melanoma \\(bad\\)' cannot be class names"):
        _run_in_process(None, ws, f"data.manifest={csv_path}")
    csv_path.write_text("file,class\na.jpg,x\n")
    with pytest.raises(UserError, match="needs a header with 'path' and 'label'"):
        _run_in_process(None, ws, f"data.manifest={csv_path}")


# ----------------------------------------------------------------------------- user errors


def test_unknown_recipe_key_and_missing_root(cli, shared_data, tmp_path):
    r = cli("prepare", "demo", "--set", f"data.rot={tmp_path}")
    assert r.returncode == 1 and "--set data.rot: unknown key; did you mean 'data.root'?" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(UserError, match=r"data.root is not set.*--set data.root=DIR"):
        _run_in_process(None, tmp_path / "ws")
    with pytest.raises(UserError, match="nowhere is not a directory"):
        _run_in_process(tmp_path / "nowhere", tmp_path / "ws")


def _read_only_runner(ro_dir: Path):
    """How to run a command that sees ``ro_dir`` read-only, or None (with the reason)."""
    if os.geteuid() != 0:
        ro_dir.chmod(0o555)
        return (lambda argv: argv), None
    # root ignores permission bits: mount the folder read-only in a private mount namespace.
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "running as root without unshare(1): cannot make a read-only folder"
    d = str(ro_dir)
    wrap = lambda argv: [unshare, "-m", "sh", "-c",  # noqa: E731
                         'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"', d, *argv]
    probe = subprocess.run(wrap(["touch", str(ro_dir / "probe")]), capture_output=True, text=True)
    if probe.returncode == 0 or "Read-only file system" not in probe.stderr:
        (ro_dir / "probe").unlink(missing_ok=True)
        return None, f"running as root and cannot mount a read-only folder here ({probe.stderr.strip()[:200]})"
    return wrap, None


def test_read_only_workdir(cli, shared_data, tmp_path):
    """A workdir that cannot be written: exit 1, a message naming it, nothing half-written."""
    root = _small_root(shared_data, tmp_path / "data")
    ws = tmp_path / "ws"
    ws.mkdir()
    wrap, why = _read_only_runner(ws)
    if wrap is None:
        pytest.skip(why)
    try:
        base = [sys.executable, "-m", "medsynth", "prepare", "demo", "--set", f"data.root={root}"]
        r = subprocess.run(wrap(base + ["--set", f"workdir={ws}"]), capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert f"cannot write to {ws}: the directory is read-only" in r.stderr and "--set workdir=DIR" in r.stderr
        assert list(ws.iterdir()) == []
        # The same when the workdir is to be created inside the read-only folder.
        r = subprocess.run(wrap(base + ["--set", f"workdir={ws / 'sub'}"]), capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"cannot write {ws / 'sub'}" in r.stderr and "--set workdir=DIR" in r.stderr
        assert list(ws.iterdir()) == []
    finally:
        ws.chmod(0o755)


def test_json_output_and_quiet(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "data")
    r = _prepare(cli, root, tmp_path / "ws", "--json", "-q")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout holds exactly one JSON object
    assert set(out) >= {"stage", "workdir", "manifest", "classes", "n_train", "n_test", "skipped"}
    assert (out["n_train"], out["n_test"]) == (15, 3)
    assert r.stderr == ""  # -q: no progress bars or info
    # Without --json, stdout is just the manifest path.
    r = _prepare(cli, root, tmp_path / "ws")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "ws" / "manifest.csv")
    assert "prepare: 18 images (15 train / 3 test)" in r.stderr


def test_duplicates_warned(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "data")
    src = sorted((root / "melanoma").glob("*.jpg"))[0]
    shutil.copy(src, root / "dermatofibroma" / "copy.jpg")
    r = _prepare(cli, root, tmp_path / "ws")
    assert r.returncode == 0, r.stderr
    assert "1 image(s) are byte-identical copies" in r.stderr
    assert Counter(x["sha256"] for x in _rows(tmp_path / "ws" / "manifest.csv")).most_common(1)[0][1] == 2


@pytest.mark.parametrize("fraction,n_test", [(0.5, 3), (0.1, 1), (0.4, 2)])
def test_test_fraction(shared_data, tmp_path, fraction, n_test):
    from medsynth import data
    from medsynth.recipe import load_recipe

    root = _small_root(shared_data, tmp_path / "data", classes=["melanoma"])
    r = load_recipe("demo", [f"data.root={root}", f"workdir={tmp_path / 'ws'}", f"data.test_fraction={fraction}"])
    data.run(r)
    # At least one test image and at least one train image per class, whatever the fraction.
    assert data.summary(tmp_path / "ws")["classes"]["melanoma"] == {"train": 6 - n_test, "test": n_test}


def test_hidden_files_and_folders_are_ignored(shared_data, tmp_path):
    from medsynth import data
    from medsynth.recipe import load_recipe

    root = _small_root(shared_data, tmp_path / "data", classes=["melanoma"])
    (root / "melanoma" / ".ipynb_checkpoints").mkdir()
    (root / "melanoma" / ".ipynb_checkpoints" / "x.jpg").write_bytes(b"junk")
    (root / "melanoma" / "._resource-fork.jpg").write_bytes(b"junk")
    (root / "melanoma" / "nested").mkdir()
    shutil.copy(next((root / "melanoma").glob("*.jpg")), root / "melanoma" / "nested" / "deeper.JPG")
    (root / ".cache").mkdir()  # not a class
    r = load_recipe("demo", [f"data.root={root}", f"workdir={tmp_path / 'ws'}"])
    data.run(r)
    rows = _rows(tmp_path / "ws" / "manifest.csv")
    assert len(rows) == 7 and any(x["path"].endswith("nested/deeper.JPG") for x in rows)
    assert [c["name"] for c in data.read_classes(tmp_path / "ws")] == ["melanoma"]
