"""The workspace mark: stages write only into folders medsynth made (or adopted), never into data or other files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from medsynth.errors import UserError
from medsynth.workspace import MARK

from conftest import ONE_THREAD

SMALL = ["dermatofibroma", "melanoma", "vascular-lesion"]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root, with the sha256 of each file's bytes: equal = nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _small_root(shared_data: Path, dest: Path, per_class: int = 4) -> Path:
    for c in SMALL:
        (dest / c).mkdir(parents=True)
        for src in sorted((shared_data / "ham10000" / c).glob("*.jpg"))[:per_class]:
            shutil.copy(src, dest / c / src.name)
    return dest


def _recipe(*sets: str):
    from medsynth.recipe import load_recipe

    return load_recipe("demo", list(sets))


def test_prepare_refuses_the_data_folder_and_a_foreign_folder_and_changes_nothing(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "kvasir")
    # The user's own files, with the names medsynth writes.
    (root / "manifest.csv").write_text("path,label\nmelanoma/a.jpg,melanoma\n")
    (root / "captions.jsonl").write_text('{"path": "x", "caption": "mine"}\n')
    before = _snapshot(root)

    for workdir, says in ((root, "is the data folder"), (root / "runs" / "x", "lies inside the data folder")):
        r = cli("prepare", "demo", "--set", f"data.root={root}", "--set", f"workdir={workdir}")
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert f"workdir {workdir} {says} (data.root: {root})" in r.stderr and "--set workdir=runs/<name>" in r.stderr
        assert _snapshot(root) == before

    # A folder of other files: refused although it is not the data folder.
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    (project / "manifest.csv").write_text("my,own\n1,2\n")
    (project / "notes" / "todo.txt").write_text("keep me\n")
    mine = _snapshot(project)
    r = cli("prepare", "demo", "--set", f"data.root={root}", "--set", f"workdir={project}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"workdir {project} is not a medsynth workspace: it is not empty (manifest.csv, notes)" in r.stderr
    assert f"no {MARK} mark" in r.stderr and "--set workdir=runs/<name>" in r.stderr
    assert _snapshot(project) == mine and _snapshot(root) == before

    # A CSV manifest's own folder is the data folder too.
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "manifest.csv").write_text("".join(
        ["path,label\n"] + [f"{p},{p.parent.name}\n" for p in sorted(root.rglob("*.jpg"))]))
    lists = _snapshot(tmp_path / "lists")
    r = cli("prepare", "demo", "--set", f"data.manifest={tmp_path / 'lists' / 'manifest.csv'}", "--set", f"workdir={tmp_path / 'lists'}")
    assert r.returncode == 1 and f"workdir {tmp_path / 'lists'} is the folder of data.manifest" in r.stderr
    assert _snapshot(tmp_path / "lists") == lists

    # A new folder becomes a marked workspace; prepare runs again in it.
    ws = tmp_path / "runs" / "skin"
    for _ in range(2):
        r = cli("prepare", "demo", "--set", f"data.root={root}", "--set", f"workdir={ws}")
        assert r.returncode == 0, r.stderr
    doc = json.loads((ws / MARK).read_text())
    assert set(doc) >= {"medsynth", "created"}
    assert _snapshot(root) == before


def test_caption_refuses_a_foreign_folder_with_captions_and_leaves_it_intact(cli, shared_data, tmp_path):
    root = _small_root(shared_data, tmp_path / "data")
    ws = tmp_path / "ws"
    sets = ["--set", f"data.root={root}", "--set", "caption.source=simple"]
    r = cli("prepare", "demo", *sets, "--set", f"workdir={ws}")
    assert r.returncode == 0, r.stderr

    # A folder that holds the user's captions.jsonl and copies of prepare's files, but no mark.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("manifest.csv", "classes.json"):
        shutil.copy(ws / name, other / name)
    (other / "captions.jsonl").write_text('{"path": "a.jpg", "caption": "written by hand over a week"}\n')
    before = _snapshot(other)
    r = cli("caption", "demo", *sets, "--set", f"workdir={other}", env=ONE_THREAD)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"workdir {other} is not a medsynth workspace" in r.stderr and "--set workdir=runs/<name>" in r.stderr
    assert _snapshot(other) == before

    # The data folder, where an earlier version wrote its workspace: refused too, data untouched.
    shutil.copytree(ws / "prepare", root / "prepare")
    for name in ("manifest.csv", "classes.json"):
        shutil.copy(ws / name, root / name)
    (root / "captions.jsonl").write_text('{"path": "a.jpg", "caption": "mine"}\n')
    before = _snapshot(root)
    r = cli("caption", "demo", *sets, "--set", f"workdir={root}", env=ONE_THREAD)
    assert r.returncode == 1 and f"workdir {root} is the data folder" in r.stderr
    assert _snapshot(root) == before


def test_workspace_of_an_earlier_version_is_recognised_and_marked(shared_data, tmp_path):
    from medsynth import data, workspace

    root = _small_root(shared_data, tmp_path / "data")
    ws = tmp_path / "ws"
    r = _recipe(f"data.root={root}", f"workdir={ws}")
    data.run(r)
    assert (ws / MARK).is_file()
    (ws / MARK).unlink()  # as an earlier version left it: manifest.csv + classes.json + prepare/provenance.json
    (ws / "captions.jsonl").write_text("")
    assert workspace.require(r) == ws and (ws / MARK).is_file()  # a later stage adopts it
    (ws / MARK).unlink()
    data.run(r)  # so does prepare
    assert (ws / MARK).is_file()

    # Without prepare's provenance it is not recognisable: refused.
    (ws / MARK).unlink()
    shutil.rmtree(ws / "prepare")
    with pytest.raises(UserError, match="is not a medsynth workspace"):
        workspace.require(r)
    with pytest.raises(UserError, match="is not a medsynth workspace"):
        data.run(r)
    # A stage before prepare: the usual "run prepare first"; a workdir holding only the stage
    # keys that `medsynth run` records first is still new.
    fresh = _recipe(f"data.root={root}", f"workdir={tmp_path / 'fresh'}")
    with pytest.raises(UserError, match="classes.json not found: run `medsynth prepare`"):
        workspace.require(fresh)
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "stages.json").write_text("{}")
    data.run(fresh)
    assert (tmp_path / "fresh" / MARK).is_file()


def test_class_discovery_skips_workspaces_and_medsynth_folders(shared_data, tmp_path):
    from medsynth import data

    root = _small_root(shared_data, tmp_path / "data")
    png = next((root / "melanoma").glob("*.jpg")).read_bytes()

    def fake_ws(path: Path) -> None:  # a workspace holds images too: sample grids, plots
        (path / "finetune" / "samples").mkdir(parents=True)
        (path / "finetune" / "samples" / "grid.jpg").write_bytes(png)
        (path / MARK).write_text("{}")

    fake_ws(root / "old-ws")
    fake_ws(root / "runs" / "skin")  # a folder of workspaces
    fake_ws(root / "melanoma" / "nested-ws")  # inside a class folder: its images are not data
    r = _recipe(f"data.root={root}", f"workdir={tmp_path / 'ws'}")
    data.run(r)
    assert [c["name"] for c in data.read_classes(tmp_path / "ws")] == SMALL
    assert not [x for x in data.read_manifest(tmp_path / "ws") if "grid" in x.path]

    # A data folder an earlier version used as its workdir: its stage folders are not classes.
    shutil.rmtree(root / "old-ws")
    shutil.rmtree(root / "runs")
    for name in ("manifest.csv", "classes.json"):
        shutil.copy(tmp_path / "ws" / name, root / name)
    shutil.copytree(tmp_path / "ws" / "prepare", root / "prepare")
    (root / "score").mkdir()
    (root / "score" / "real_vs_synthetic.jpg").write_bytes(png)
    data.run(r)
    assert [c["name"] for c in data.read_classes(tmp_path / "ws")] == SMALL


def test_run_refuses_the_data_folder_before_writing_its_stage_record(cli, shared_data, tmp_path):
    # `medsynth run` keeps stages.json in the workdir: the guard must come before that first write.
    root = _small_root(shared_data, tmp_path / "data", per_class=3)
    before = _snapshot(root)
    r = cli("run", "demo", "--set", f"data.root={root}", "--set", f"workdir={root}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"workdir {root} is the data folder" in r.stderr
    assert not (root / "stages.json").exists()
    assert _snapshot(root) == before
