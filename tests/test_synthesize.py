"""synthesize stage end to end on the tiny base model (CPU): counts, read-back, determinism, resume, workers.

One small prepared workspace (2 HyperKvasir classes, 3 images each, 32 px tiny model) is
built once for the module; a reference run through the real CLI is compared byte for byte
with every other way of producing the same plan (resumed after kill -9, split over workers,
run again).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsynth.errors import UserError

from _helpers import kill_medsynth_when, prepare_manifest_workspace, tiny_manifest_recipe

CLASSES = ("impacted-stool", "polyps")
PER_IMAGES = 3
PER_CLASS = 7
N = PER_CLASS * len(CLASSES)  # 14 samples: shards of 4, 4, 4, 2


def _recipe_text(tmp: Path, manifest: Path) -> str:
    return tiny_manifest_recipe("synth-test", tmp / "ws", manifest, layers=2,
                                synthesize={"steps": 2, "batch_size": 2, "shard_size": 4, "grid_per_class": 2,
                                            "prompt_source": "simple"})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """(recipe path, workdir, reference output dir) with the workspace prepared and the tiny model built."""
    prep = prepare_manifest_workspace(tmp_path_factory.mktemp("synth"), _recipe_text, CLASSES, PER_IMAGES)
    tmp, recipe_path, r = prep["tmp"], prep["recipe_path"], prep["recipe"]
    # Reference: the real CLI, uninterrupted, one process.
    ref = tmp / "ref"
    p = subprocess.run([sys.executable, "-m", "medsynth", "--json", "synthesize", str(recipe_path),
                        "--per-class", str(PER_CLASS), "--base-only", "--out", str(ref)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "MEDSYNTH_STATE_DIR": str(tmp / "state")})
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    return {"recipe": recipe_path, "workdir": r.workdir_path, "ref": ref, "result": result, "stderr": p.stderr, "tmp": tmp}


def _recipe(ws, *overrides):
    from medsynth.recipe import load_recipe

    return load_recipe(ws["recipe"], list(overrides))


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("synth-*.tar"))


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in _shards(out)}


def _images(out: Path) -> dict[str, np.ndarray]:
    from medsynth.synthesize.writer import iter_shard

    got = {}
    for p in _shards(out):
        for key, members in iter_shard(p):
            got[key] = np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB"))
    return got


# ----------------------------------------------------------------------------- the reference run


def test_per_class_writes_exactly_the_plan_readable_by_webdataset(ws):
    import webdataset as wds

    ref = ws["ref"]
    names = list(CLASSES)
    samples = list(wds.WebDataset([str(p) for p in _shards(ref)], shardshuffle=False).decode("pil"))
    assert len(samples) == PER_CLASS * len(names)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    assert sorted(keys) == sorted(f"{n}-{i:06d}" for n in names for i in range(PER_CLASS))
    for s in samples:
        label = s["__key__"].rsplit("-", 1)[0]
        meta = s["json"]
        assert int(s["cls"]) == names.index(label) == meta["cls"]
        assert meta["label"] == label and meta["key"] == s["__key__"]
        assert meta["prompt"] == f"An endoscopic image of {label.replace('-', ' ')}"
        assert meta["steps"] == 2 and meta["guidance"] == 4.5 and meta["base_model"] == "tiny"
        assert meta["adapter_hash"] is None and len(meta["recipe_hash"]) == 64
        assert isinstance(meta["seed"], int)
        assert s["png"].size == (32, 32) and s["png"].mode == "RGB"
    # Every shard mixes classes (round-robin order), shard sizes follow shard_size.
    first = [s["__key__"].rsplit("-", 1)[0] for s in samples[:2]]
    assert first == names
    index = json.loads((ref / "index.json").read_text())
    assert index["counts"] == {n: PER_CLASS for n in names} and index["total"] == N
    assert [s["count"] for s in index["shards"]] == [4, 4, 4, 2]
    assert [s["file"] for s in index["shards"]] == [p.name for p in _shards(ref)]
    assert index["class_to_index"] == {n: i for i, n in enumerate(names)}
    assert index["plan"]["rule"] == "per_class" and index["plan"]["value"] == PER_CLASS
    grid = Image.open(ref / "grid.png")
    assert grid.height == 2 * 32  # one row per class
    prov = json.loads((ref / "provenance.json").read_text())
    assert prov["complete"] and prov["stage"] == "synthesize"
    # --json result and the plan printed before work.
    res = ws["result"]
    assert res["complete"] and res["total"] == N and res["plan"]["counts"] == {n: PER_CLASS for n in names}
    assert res["generated"] == N
    assert "synthesize plan (per_class 7): 14 images" in ws["stderr"]
    # No temporary files left.
    assert not [p for p in ref.iterdir() if p.name.endswith(".tmp")]


def test_timm_wds_reader_reads_the_shards(ws):
    from timm.data import create_dataset

    ds = create_dataset("wds/medsynth", root=str(ws["ref"]), split="train", input_img_mode="RGB")
    items = list(ds)
    assert len(items) == N
    labels = sorted(int(t) for _, t in items)
    assert labels == sorted([0, 1] * PER_CLASS)


# ----------------------------------------------------------------------------- determinism, resume, scale


def test_kill_9_midway_then_rerun_gives_the_same_bytes(ws):
    from medsynth import synthesize

    out = ws["tmp"] / "killed"
    env = {**os.environ, "MEDSYNTH_SYNTH_BATCH_DELAY": "0.4", "MEDSYNTH_STATE_DIR": str(ws["tmp"] / "state")}
    # Kill once shard 0 is complete and shard 1 is half written (its temporary file exists).
    kill_medsynth_when(["-q", "synthesize", str(ws["recipe"]), "--per-class", str(PER_CLASS), "--base-only",
                        "--out", str(out)],
                       lambda: (out / "synth-000000.tar").exists() and bool(list(out.glob(".synth-000001.tar.*.tmp"))),
                       env=env)
    assert not (out / "index.json").exists()
    assert list(out.glob(".synth-*.tmp")), "expected a half-written shard"
    synthesize.run(_recipe(ws), per_class=PER_CLASS, out=out, base_only=True)
    assert synthesize.last_stats["shards_skipped"] >= 1
    assert not list(out.glob(".synth-*.tmp"))
    assert _shard_bytes(out) == _shard_bytes(ws["ref"])
    assert json.loads((out / "index.json").read_text()) == json.loads((ws["ref"] / "index.json").read_text())


def test_workers_split_union_equals_single_run_and_rerun_is_a_no_op(ws):
    from medsynth import synthesize

    out = ws["tmp"] / "workers"
    synthesize.run(_recipe(ws), per_class=PER_CLASS, out=out, base_only=True, worker="1/2")
    assert not (out / "index.json").exists()
    assert sorted(p.name for p in _shards(out)) == ["synth-000001.tar", "synth-000003.tar"]
    synthesize.run(_recipe(ws), per_class=PER_CLASS, out=out, base_only=True, worker="0/2")
    assert (out / "index.json").is_file()  # the last worker to finish writes the index
    # Same seed and settings, another process layout: byte-identical shards.
    assert _shard_bytes(out) == _shard_bytes(ws["ref"])
    before = {p.name: p.stat().st_mtime_ns for p in _shards(out)}
    synthesize.run(_recipe(ws), per_class=PER_CLASS, out=out, base_only=True)
    assert synthesize.last_stats["generated"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in _shards(out)} == before


def test_batch_size_1_matches_batch_size_4_within_one_grey_level(ws):
    """CPU GEMM kernels may block differently for 1 vs 4 rows, so float results can differ in the last
    bits; after rounding to 8 bit this moves a few pixels by one level at most. Shards never mix
    batch layouts of one run, so byte-identity across processes is unaffected (tested above)."""
    import torch

    from medsynth.models.loading import load_components
    from medsynth.synthesize.engine import Engine
    from medsynth.synthesize.plan import make_plan
    from medsynth.synthesize.prompts import build_prompts

    r = _recipe(ws)
    plan = make_plan(r, [{"index": i, "name": c, "category": c} for i, c in enumerate(CLASSES)], per_class=2)
    prompts, _ = build_prompts(r, plan, ws["workdir"])
    comps = load_components(r, device="cpu", dtype=torch.float32)
    engine = Engine(comps, resolution=32, steps=2, guidance=4.5, negative_prompt="", max_text_tokens=16,
                    device="cpu", dtype=torch.float32)
    samples = plan.samples()
    four = np.stack(engine.generate(samples, prompts))
    ones = np.stack([engine.generate([x], prompts)[0] for x in samples])
    assert engine.n_encoded == 3  # the negative prompt + one per distinct prompt, however many images
    diff = np.abs(four.astype(int) - ones.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01
    # The batch's images are the reference run's images for the same keys (same plan order).
    ref = _images(ws["ref"])
    for x, img in zip(samples, ones):
        assert np.abs(ref[x.key].astype(int) - img.astype(int)).max() <= 1


def test_each_sample_has_its_own_noise_and_changed_settings_restart_cleanly(ws):
    from medsynth import synthesize

    ref = _images(ws["ref"])
    # Same class, same prompt, other index: other noise, other image.
    for c in CLASSES:
        imgs = [ref[f"{c}-{i:06d}"] for i in range(PER_CLASS)]
        assert all(not np.array_equal(imgs[0], x) for x in imgs[1:])
    out = ws["tmp"] / "restart"
    synthesize.run(_recipe(ws), per_class=2, out=out, base_only=True)
    assert len(_images(out)) == 4
    # Same directory, other plan and JPEG: the old synthesis is replaced, not mixed in.
    synthesize.run(_recipe(ws, "synthesize.image_format=jpg", "synthesize.jpg_quality=90"), per_class=1,
                   out=out, base_only=True)
    from medsynth.synthesize.writer import iter_shard

    members = [(k, sorted(m)) for p in _shards(out) for k, m in iter_shard(p)]
    assert members == [(f"{c}-000000", ["cls", "jpg", "json"]) for c in CLASSES]
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == len(CLASSES) and index["image_format"] == "jpg"
    assert (out / "grid.png").is_file()


def test_imagefolder_format(ws):
    from medsynth import synthesize

    out = ws["tmp"] / "folders"
    synthesize.run(_recipe(ws), per_class=2, out=out, base_only=True, fmt="imagefolder")
    for c in CLASSES:
        files = sorted(p.name for p in (out / c).iterdir())
        assert files == [f"{c}-000000.png", f"{c}-000001.png"]
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and all((out / m["file_name"]).is_file() for m in meta)
    assert {m["label"]: m["cls"] for m in meta} == {c: i for i, c in enumerate(CLASSES)}
    assert json.loads((out / "index.json").read_text())["format"] == "imagefolder"
    # Resume: a lost image and a temporary file left by a kill; the rerun restores the same bytes.
    lost = out / CLASSES[1] / f"{CLASSES[1]}-000001.png"
    before = lost.read_bytes()
    lost.unlink()
    stale = out / CLASSES[1] / f".{CLASSES[1]}-000001.png.abcd.tmp"
    stale.write_bytes(b"half")
    synthesize.run(_recipe(ws), per_class=2, out=out, base_only=True, fmt="imagefolder")
    assert lost.read_bytes() == before and not stale.exists()
    assert synthesize.last_stats["generated"] == 2  # only the batch holding the lost image


# ----------------------------------------------------------------------------- adapters


def test_lora_dir_is_applied_and_hashed(ws):
    """A finetune output (full DiT variant, the tiny base's mode) changes the images; its hash is recorded."""
    import torch

    from medsynth import synthesize
    from medsynth.finetune.adapters import adapter_hash
    from medsynth.models.loading import load_components

    r = _recipe(ws)
    final = ws["tmp"] / "ft" / "final"
    comps = load_components(r, parts=("transformer",), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in comps.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    comps.transformer.save_pretrained(final / "transformer")
    (final / "adapter.json").write_text(json.dumps({"kind": "full", "base": "tiny"}))
    out = ws["tmp"] / "lora"
    synthesize.run(r, per_class=1, out=out, lora=final)
    got, ref = _images(out), _images(ws["ref"])
    assert all(not np.array_equal(got[k], ref[k]) for k in got)
    meta = json.loads(next(iter(_meta(out))))
    assert meta["adapter_hash"] == adapter_hash(final)


def _meta(out: Path):
    from medsynth.synthesize.writer import iter_shard

    for p in _shards(out):
        for _, members in iter_shard(p):
            yield members["json"].decode()


# ----------------------------------------------------------------------------- bad input


def test_no_finetune_output_names_the_expected_directory(ws):
    from medsynth import synthesize

    with pytest.raises(UserError) as e:
        synthesize.run(_recipe(ws), per_class=1, out=ws["tmp"] / "nope")
    msg = str(e.value)
    assert str(ws["workdir"] / "finetune" / "final") in msg and "--base-only" in msg and "--lora" in msg


def test_bad_input_exits_1_without_traceback(ws, cli):
    p = cli("synthesize", str(ws["recipe"]), "--base-only", "--worker", "5/2")
    assert p.returncode == 1
    assert "--worker '5/2'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("overrides, kwargs, message", [
    (["synthesize.counts={polyps: 2, polyp: 1}"], {}, "synthesize.counts.polyp: unknown class; did you mean 'polyps'"),
    ([], {"per_class": -1}, "--per-class -1"),
    ([], {"worker": "2/2"}, "--worker '2/2'"),
    ([], {"worker": "half"}, "expected I/N"),
    ([], {"fmt": "zip"}, "--format 'zip'"),
    ([], {"lora": "x", "base_only": True}, "exclude each other"),
    ([], {"lora": "/nonexistent/final", "base_only": False}, "--lora /nonexistent/final: not a directory"),
])
def test_bad_input_is_a_user_error(ws, overrides, kwargs, message):
    from medsynth import synthesize

    kw = {"base_only": True, "out": ws["tmp"] / "bad", **kwargs}
    with pytest.raises(UserError) as e:
        synthesize.run(_recipe(ws, *overrides), **kw)
    assert message in str(e.value)


def test_negative_count_is_a_recipe_error(ws):
    from medsynth.errors import RecipeError

    with pytest.raises(RecipeError, match="synthesize.counts.polyps.*negative"):
        _recipe(ws, "synthesize.counts={polyps: -2}")


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompts"),
    ("# only a comment\n", "holds no prompts"),
    ("polyps\tA polyp\nnot-a-class\tsomething\n", "unknown class 'not-a-class'"),
    ("polyps\tA polyp\n", "no prompt for class(es) impacted-stool"),
    ("polyps A polyp\n", "no TAB"),
    ("polyps\t  \n", "empty prompt"),
])
def test_prompt_file_problems(ws, content, message):
    from medsynth import synthesize

    f = ws["tmp"] / "prompts.tsv"
    f.write_text(content)
    with pytest.raises(UserError) as e:
        synthesize.run(_recipe(ws, "synthesize.prompt_source=file", f"synthesize.prompt_file={f}"),
                       per_class=1, base_only=True, out=ws["tmp"] / "bad")
    assert message in str(e.value)


def test_foreign_output_directory_is_refused(ws):
    from medsynth import synthesize

    out = ws["tmp"] / "foreign"
    out.mkdir()
    (out / "my-notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        synthesize.run(_recipe(ws), per_class=1, out=out, base_only=True)
    assert (out / "my-notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one(ws):
    """On the CPU a float sum split over other thread counts can round differently, so the ranks get
    the thread count of the reference run (torchrun would set OMP_NUM_THREADS=1); see docs/output-format.md."""
    import torch

    out = ws["tmp"] / "torchrun"
    env = {**os.environ, "MEDSYNTH_STATE_DIR": str(ws["tmp"] / "state"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                        "-m", "medsynth", "synthesize", str(ws["recipe"]), "--per-class", str(PER_CLASS),
                        "--base-only", "--out", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "worker 0/2" in p.stderr and "worker 1/2" in p.stderr
    assert _shard_bytes(out) == _shard_bytes(ws["ref"])
    assert (out / "index.json").is_file()
