"""Caption stage end to end: tiny real LLaVA-Next + T5 simplifier, real HAM10000 images, the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ONE_THREAD
import yaml

from medsynth.caption import run as caption_run
from medsynth.caption import stats
from medsynth.caption.text import has_prefix
from medsynth.data import read_classes, read_manifest
from medsynth.data import run as prepare_run
from medsynth.errors import UserError
from medsynth.images import read_image
from medsynth.prompts import simple_caption
from medsynth.recipe import load_recipe
from medsynth.models.loading import load_tokenizer
from tiny_vlm import build_tiny_llava_next, build_tiny_t5_simplifier
from _helpers import kill_medsynth_when, link_subset, shared_data_dir

CLASSES = ("melanocytic-nevus", "melanoma", "vascular-lesion")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Data root with 4 real images of each of 3 HAM10000 classes, a tiny VLM, simplifier and base tokenizer."""
    root = tmp_path_factory.mktemp("caption-assets")
    link_subset(shared_data_dir() / "ham10000", root / "data", CLASSES, per_class=4, copy=True)
    build_tiny_llava_next(root / "vlm")
    build_tiny_t5_simplifier(root / "t5")
    return root


def _recipe_file(assets: Path, work: Path, **caption) -> Path:
    cap = {"source": "vlm", "model": str(assets / "vlm"), "simplify_model": str(assets / "t5"), "dtype": "fp32",
           "device": "cpu", "batch_size": 4, "max_new_tokens": 16, "prefix_retries": 1, "simplify_retries": 1}
    cap.update(caption)
    doc = {"name": "captest", "workdir": str(work / "ws"), "seed": 3, "modality": "dermoscopic",
           "data": {"root": str(assets / "data")},
           "model": {"base": "tiny", "max_text_tokens": 24},
           "caption": cap}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _prepared(assets: Path, work: Path, **caption):
    path = _recipe_file(assets, work, **caption)
    recipe = load_recipe(path)
    prepare_run(recipe)
    return path, recipe


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "captions.jsonl").read_text().splitlines()]


def _check_complete(recipe, records):
    tok = load_tokenizer(recipe)  # the base model's T5 tokenizer (tiny: built from the recipe's texts)
    train = read_manifest(recipe.workdir_path, "train")
    cats = {c["name"]: c["category"] for c in read_classes(recipe.workdir_path)}
    assert sorted(r["path"] for r in records) == sorted(r.path for r in train)  # exactly one per train image
    for r in records:
        assert has_prefix(r["caption"], simple_caption("dermoscopic", cats[r["label"]])), r["caption"]
        n = len(tok(r["caption"])["input_ids"])
        assert r["n_tokens"] == n <= recipe.model.max_text_tokens


@pytest.fixture(scope="module")
def vlm_run(assets, tmp_path_factory):
    """One uninterrupted `medsynth caption` run with the tiny VLM (shared by the tests below)."""
    from conftest import run_cli

    work = tmp_path_factory.mktemp("vlm-run")
    path, recipe = _prepared(assets, work)
    res = run_cli("caption", str(path), "--json", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    return recipe, res, _records(recipe.workdir_path)


def test_vlm_captions_via_cli(assets, vlm_run, capsys):
    recipe, res, records = vlm_run
    summary = json.loads(res.stdout)
    _check_complete(recipe, records)
    assert summary["n"] == len(records) == 9 and summary["sources"] == ["vlm"]
    assert {r["source"] for r in records} == {"vlm"} and {r["model"] for r in records} == {str(assets / "vlm")}
    # A random tiny VLM never writes the prefix and babbles past 24 tokens: both repairs must have run.
    assert {r["how"] for r in records} <= {"prefixed", "simplified", "truncated"}
    assert any(r["how"] in ("simplified", "truncated") for r in records)
    assert all(r["generations"] == 2 for r in records if r["how"] == "prefixed")
    prov = json.loads((recipe.workdir_path / "caption" / "provenance.json").read_text())
    assert prov["complete"] and prov["n_captions"] == 9
    assert (recipe.workdir_path / "caption" / "config.yaml").is_file()
    # A rerun has nothing to do and leaves the file untouched.
    before = (recipe.workdir_path / "captions.jsonl").read_bytes()
    caption_run(recipe)
    assert "9 already captioned" in capsys.readouterr().err
    assert (recipe.workdir_path / "captions.jsonl").read_bytes() == before


def test_kill_9_then_resume_gives_the_same_captions(assets, vlm_run, tmp_path, capsys):
    path, recipe = _prepared(assets, tmp_path)
    out = recipe.workdir_path / "captions.jsonl"
    env = {**os.environ, **ONE_THREAD}
    kill_medsynth_when(["caption", str(path), "-q"], lambda: out.is_file() and out.read_bytes().count(b"\n") >= 1,
                       env=env, timeout=120, poll=0.02)
    n_before = out.read_bytes().count(b"\n")
    assert 1 <= n_before < 9
    with open(out, "ab") as fh:  # and as if the kill had torn a write in half
        fh.write(b'{"path": "/torn", "capt')
    caption_run(recipe)
    assert "incomplete" in capsys.readouterr().err
    resumed = _records(recipe.workdir_path)
    paths = [r["path"] for r in resumed]
    assert len(paths) == len(set(paths)) == 9
    _check_complete(recipe, resumed)
    # The uninterrupted run with the same settings wrote exactly the same captions.
    assert {r["path"]: r["caption"] for r in resumed} == {r["path"]: r["caption"] for r in vlm_run[2]}


def test_simple_empty_stats_sources_and_source_change(assets, tmp_path):
    _, recipe = _prepared(assets, tmp_path, source="simple")
    wd = recipe.workdir_path
    cats = {c["name"]: c["category"] for c in read_classes(wd)}
    caption_run(recipe)
    recs = _records(wd)
    assert {r["source"] for r in recs} == {"simple"} and len(recs) == 9
    assert all(r["caption"] == simple_caption("dermoscopic", cats[r["label"]]) for r in recs)

    caption_run(recipe, source="empty")
    recs = _records(wd)
    assert {r["source"] for r in recs} == {"empty"} and {r["caption"] for r in recs} == {""}
    assert {r["n_tokens"] for r in recs} == {1}
    assert len(list((wd / "caption" / "previous").glob("captions-*.jsonl"))) == 1  # the simple captions were kept

    caption_run(recipe, source="stats")
    recs = _records(wd)
    assert {r["source"] for r in recs} == {"stats"} and len(recs) == 9
    _check_complete(recipe, recs)
    assert all(r["how"] in ("generated", "truncated") for r in recs)

    caption_run(recipe, source="stats", all_splits=True)
    assert len(_records(wd)) == 12
    caption_run(recipe, source="stats")  # back to train only: test-split captions leave the file
    assert sorted(r["path"] for r in _records(wd)) == sorted(r.path for r in read_manifest(wd, "train"))


def test_stats_captions_name_the_colours_they_see(shared_data):
    vascular = sorted((shared_data / "ham10000" / "vascular-lesion").glob("*.jpg"))[2]
    nevus = sorted((shared_data / "ham10000" / "melanocytic-nevus").glob("*.jpg"))[1]
    fv, fn = stats.measure(read_image(vascular)), stats.measure(read_image(nevus))
    words_v, words_n = {c for c, _ in fv.colours}, {c for c, _ in fn.colours}
    assert words_v != words_n and fv.colours[0][0] != fn.colours[0][0]
    # The vascular lesion is named in red/purple hues, the nevus in browns.
    assert fv.colours[0][0] in ("red", "crimson", "dark red", "magenta", "purple", "mauve")
    assert any("brown" in c for c in words_n)
    cv = stats.caption(read_image(vascular), "A dermoscopic image of vascular lesion")
    cn = stats.caption(read_image(nevus), "A dermoscopic image of melanocytic nevus")
    assert cv.startswith("A dermoscopic image of vascular lesion. A ")
    assert fv.colours[0][0] in cv and fn.colours[0][0] in cn
    assert stats.caption(read_image(vascular), "P") == stats.caption(read_image(vascular), "P")  # deterministic


def test_file_source_matches_paths_and_lists_missing(assets, tmp_path):
    _, recipe = _prepared(assets, tmp_path, source="file", file=str(tmp_path / "caps.csv"))
    train = read_manifest(recipe.workdir_path, "train")
    lines = ["path,caption"]
    for i, r in enumerate(train):
        p = Path(r.path)
        ref = p.name if i % 3 == 0 else (f"{p.parent.name}/{p.name}" if i % 3 == 1 else str(p))
        lines.append(f'{ref},"lesion {i}, seen"')
    (tmp_path / "caps.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match=r"no caption for 1 image\(s\)") as e:
        caption_run(recipe)
    assert Path(train[-1].path).as_posix() in str(e.value)
    assert not (recipe.workdir_path / "captions.jsonl").exists()  # failed before any work
    (tmp_path / "caps.csv").write_text("\n".join(lines) + "\n")
    caption_run(recipe)
    recs = {r["path"]: r for r in _records(recipe.workdir_path)}
    assert {r["source"] for r in recs.values()} == {"file"}
    for i, r in enumerate(train):
        assert recs[r.path]["caption"] == f"lesion {i}, seen" and recs[r.path]["how"] == "generated"
    # JSONL works the same; a changed caption file means new captions (its hash is in the settings).
    jl = tmp_path / "caps.jsonl"
    jl.write_text("".join(json.dumps({"path": r.path, "caption": f"jsonl {i}"}) + "\n" for i, r in enumerate(train)))
    recipe.caption.file = str(jl)
    caption_run(recipe)
    recs = {r["path"]: r["caption"] for r in _records(recipe.workdir_path)}
    assert recs == {r.path: f"jsonl {i}" for i, r in enumerate(train)}


def test_missing_vlm_weights_fail_before_work(assets, tmp_path, monkeypatch):
    _, recipe = _prepared(assets, tmp_path, model="nobody/no-such-llava")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = caption_run(recipe, source="simple")
    before = out.read_bytes()
    with pytest.raises(UserError, match="nobody/no-such-llava") as e:
        caption_run(recipe)
    assert "hf download" in str(e.value)
    # It failed before any work: the simple captions were neither replaced nor moved aside.
    assert out.read_bytes() == before and not (recipe.workdir_path / "caption" / "previous").exists()
    recipe.caption.model = str(tmp_path / "nowhere" / "x" / "model")
    with pytest.raises(UserError, match="is not a directory"):
        caption_run(recipe)


def test_missing_simplifier_fails_before_any_captioning(assets, tmp_path):
    """Issue 13.2: an absent simplifier is found before the VLM captions anything or old captions move."""
    from conftest import run_cli

    path, recipe = _prepared(assets, tmp_path, simplify_model="medsynth-test/no-such-simplifier")
    wd = recipe.workdir_path
    out = caption_run(recipe, source="simple")  # the old captions (they all fit: no simplifier needed)
    before = out.read_bytes()
    res = run_cli("caption", str(path), env=ONE_THREAD)  # source vlm, from the recipe
    assert res.returncode == 1, res.stderr
    assert "caption.simplify_model" in res.stderr and "medsynth-test/no-such-simplifier" in res.stderr
    assert "Traceback" not in res.stderr
    assert out.read_bytes() == before
    assert not (wd / "caption" / "previous").exists()


def test_simplifier_is_checked_only_when_a_known_caption_is_too_long(assets, tmp_path):
    caps = tmp_path / "caps.jsonl"
    _, recipe = _prepared(assets, tmp_path, source="file", file=str(caps),
                          simplify_model="medsynth-test/no-such-simplifier")
    wd = recipe.workdir_path
    train = read_manifest(wd, "train")
    caps.write_text("".join(json.dumps({"path": r.path, "caption": f"lesion {i}"}) + "\n" for i, r in enumerate(train)))
    out = caption_run(recipe)  # every caption fits: the missing simplifier is never needed
    before = out.read_bytes()
    long = " ".join(["a brown lesion with an irregular border"] * 12)
    caps.write_text("".join(json.dumps({"path": r.path, "caption": long if i == 0 else f"other {i}"}) + "\n"
                            for i, r in enumerate(train)))
    with pytest.raises(UserError, match="caption.simplify_model: .*no-such-simplifier"):
        caption_run(recipe)
    assert out.read_bytes() == before and not (wd / "caption" / "previous").exists()
    recipe.caption.simplify_retries = 0  # no simplifier wanted: the long caption is cut instead
    caption_run(recipe)
    assert {r["how"] for r in _records(wd) if r["caption"].startswith("a brown")} == {"truncated"}
    caption_run(recipe, source="stats")  # never simplifies
    assert {r["source"] for r in _records(wd)} == {"stats"}


def test_sd_family_fits_captions_to_clip_77_tokens(assets, tmp_path):
    """A text family's caption stage counts with that family's tokenizer (CLIP for sd) and caps the
    limit at the encoder's own 77 tokens, even when model.max_text_tokens allows more; the family is
    part of the caption settings, so switching it on the same base captions again."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    long = "a lesion with " + ", ".join(f"speckle {i} of uneven brown tone" for i in range(40))
    path = _recipe_file(assets, tmp_path, source="file", file=str(tmp_path / "caps.csv"), simplify_retries=0)
    doc = yaml.safe_load(path.read_text())
    doc["model"].update(max_text_tokens=120, resolution=64, tiny={"autoencoder": "taef2"})
    path.write_text(yaml.safe_dump(doc))
    pix = load_recipe(path)
    prepare_run(pix)
    rows = read_manifest(pix.workdir_path, "train")
    (tmp_path / "caps.csv").write_text("path,caption\n" + "".join(f'{r.path},"{long}"\n' for r in rows))

    caption_run(pix)
    t5 = load_tokenizer(pix)
    assert isinstance(t5, T5TokenizerFast) or type(t5).__name__.startswith("T5")
    pix_recs = _records(pix.workdir_path)
    assert max(r["n_tokens"] for r in pix_recs) > 77  # PixArt's T5 keeps up to model.max_text_tokens (120)

    sd = load_recipe(path, ["model.family=sd"])
    caption_run(sd)  # the family changed: every image is captioned again, for CLIP
    clip = load_tokenizer(sd)
    assert isinstance(clip, CLIPTokenizer) and clip.model_max_length == 77
    recs = _records(sd.workdir_path)
    assert len(recs) == len(rows) and {r["settings"] for r in recs} != {r["settings"] for r in pix_recs}
    for r in recs:
        n = len(clip(r["caption"])["input_ids"])
        assert r["n_tokens"] == n <= 77, (n, r["caption"])
        assert r["how"] == "truncated"
