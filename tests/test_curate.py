"""Curation of generated candidates by a judge classifier (synthesize.curate), on the tiny base (CPU).

One workspace (2 HyperKvasir classes, 5 images each, 32 px tiny model, a from-scratch resnet10t
judge trained for one epoch at 32 px). A curated run with min_distance 0 measures the candidates'
nearest-real distances; a threshold between them then forces near-copies to be dropped, and the
kept samples are checked against it with distances recomputed independently of curate.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medsynth.errors import UserError

from _helpers import kill_medsynth_when, prepare_manifest_workspace, tiny_manifest_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("impacted-stool", "polyps")
PER_CLASS = 2
OVERSAMPLE = 3.0


def _recipe_text(tmp: Path, manifest: Path, min_distance: float, min_score: float = 0.0) -> str:
    return tiny_manifest_recipe(
        "curate-test", tmp / "ws", manifest,
        synthesize={"per_class": PER_CLASS, "steps": 2, "batch_size": 2, "shard_size": 3, "grid_per_class": 0,
                    "prompt_source": "simple",
                    "curate": {"enabled": True, "oversample": OVERSAMPLE, "judge": "real", "min_score": min_score,
                               "min_distance": min_distance}},
        classify={"model": "resnet10t", "pretrained": False, "image_size": 32, "epochs": 1, "batch_size": 8,
                  "device": "cpu", "num_workers": 0})


def _write_recipe(ws, name: str, **kw) -> Path:
    p = ws["tmp"] / name
    p.write_text(_recipe_text(ws["tmp"], ws["manifest"], **kw))
    return p


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from medsynth import synthesize
    from medsynth.recipe import load_recipe

    prep = prepare_manifest_workspace(tmp_path_factory.mktemp("curate"),
                                      lambda tmp, manifest: _recipe_text(tmp, manifest, min_distance=0.0),
                                      CLASSES, per_class=5, recipe_name="probe.yaml")
    tmp, r = prep["tmp"], prep["recipe"]
    ws = {"tmp": tmp, "manifest": prep["manifest"]}
    assert not (r.workdir_path / "classify" / "real").exists()
    # Probe: curation without a distance threshold, to learn the candidates' distances.
    probe = tmp / "probe"
    synthesize.run(r, out=probe, base_only=True)
    index = json.loads((probe / "index.json").read_text())
    records = _records(probe)
    # Threshold: for each class the PER_CLASS-th largest distance still passes, so each class can be
    # filled in the first round, while the closest candidates of some class fall below it.
    per = {c: sorted((k["distance"] for k in records if k["label"] == c), reverse=True) for c in CLASSES}
    threshold = min(v[PER_CLASS - 1] for v in per.values())
    assert any(v[-1] < threshold for v in per.values()), f"all candidate distances equal? {per}"
    ws.update({"workdir": r.workdir_path, "probe": probe, "probe_index": index, "threshold": threshold})
    ws["recipe"] = _write_recipe(ws, "recipe.yaml", min_distance=threshold)
    ref = tmp / "ref"
    synthesize.run(load_recipe(ws["recipe"]), out=ref, base_only=True)
    ws["ref"] = ref
    ws["ref_generated"] = synthesize.last_stats["generated"]
    return ws


def _records(out: Path) -> list[dict]:
    return [k for p in sorted((out / ".curate").rglob("batch-*.json")) for k in json.loads(p.read_text())["candidates"]]


def _samples(out: Path) -> list[tuple[str, dict, bytes]]:
    from medsynth.synthesize.writer import iter_shard

    got = []
    for p in sorted(out.glob("synth-*.tar")):
        for key, m in iter_shard(p):
            got.append((key, json.loads(m["json"]), m["png"]))
    return got


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("synth-*.tar"))}


def test_judge_is_trained_first_and_recorded(ws):
    from medsynth.workspace import sha256_file

    weights = ws["workdir"] / "classify" / "real" / "model.safetensors"
    cur = ws["probe_index"]["curation"]
    assert cur["judge"] == {"path": str(weights), "sha256": sha256_file(weights), "trained_by_synthesize": True}
    assert json.loads((ws["workdir"] / "classify" / "real" / "metrics.json").read_text())["train_on"] == "real"
    # Without a threshold every candidate passes; the planned counts are written, nothing else.
    for c in CLASSES:
        r = cur["per_class"][c]
        assert r == {"target": PER_CLASS, "candidates": int(OVERSAMPLE * PER_CLASS), "dropped_low_score": 0,
                     "dropped_near_copy": 0, "kept": PER_CLASS, "acceptance_rate": round(1 / OVERSAMPLE, 6)}
    assert ws["probe_index"]["counts"] == {c: PER_CLASS for c in CLASSES}


def test_curated_samples_are_never_near_copies(ws):
    """Every kept sample's recorded distance is >= min_distance, and so is an independent recomputation."""
    import io

    from PIL import Image

    from medsynth.data import read_manifest
    from medsynth.features import classifier_extractor
    from medsynth.images import read_image

    ref, thr = ws["ref"], ws["threshold"]
    index = json.loads((ref / "index.json").read_text())
    cur = index["curation"]
    assert sum(r["dropped_near_copy"] for r in cur["per_class"].values()) >= 1
    assert index["counts"] == {c: PER_CLASS for c in CLASSES}
    samples = _samples(ref)
    assert sorted(k for k, _, _ in samples) == sorted(f"{c}-{i:06d}" for c in CLASSES for i in range(PER_CLASS))
    weights = ws["workdir"] / "classify" / "real" / "model.safetensors"
    for _, meta, _ in samples:
        assert meta["nearest_real_distance"] >= thr
        assert meta["judge"] == str(weights) and meta["judge_sha256"] == cur["judge"]["sha256"]
    # Independent recomputation: the judge's pre-logits features (score's extractor), centred cosine, numpy.
    ext = classifier_extractor(weights, "cpu")
    real = ext([read_image(r.path) for r in read_manifest(ws["workdir"], "train")])
    syn = ext([Image.open(io.BytesIO(png)).convert("RGB") for _, _, png in samples])
    center = real.mean(axis=0)
    a, b = syn - center, real - center
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    dist = 1.0 - (a @ b.T).max(axis=1)
    recorded = np.array([m["nearest_real_distance"] for _, m, _ in samples])
    np.testing.assert_allclose(dist, recorded, atol=1e-5)
    assert (dist >= thr - 1e-6).all()
    # The kept candidates are the most probable passing ones (ties: lower index), written in candidate order.
    recs = _records(ref)
    for c in CLASSES:
        ok = sorted((k for k in recs if k["label"] == c and k["distance"] >= thr), key=lambda k: (-k["score"], k["index"]))
        want = sorted(k["index"] for k in ok[:PER_CLASS])
        got = [m["candidate"] for _, m, _ in sorted(samples, key=lambda s: s[0]) if m["label"] == c]
        assert got == want
        r = cur["per_class"][c]
        assert r["candidates"] == r["dropped_low_score"] + r["dropped_near_copy"] + len(ok)
        near = [k for k in recs if k["label"] == c and k["distance"] < thr]
        assert r["dropped_near_copy"] == len(near) and r["kept"] == PER_CLASS


def test_kill_midway_then_rerun_gives_the_same_bytes(ws):
    from medsynth import synthesize
    from medsynth.recipe import load_recipe

    out = ws["tmp"] / "killed"
    env = {**os.environ, "MEDSYNTH_SYNTH_BATCH_DELAY": "1.0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    kill_medsynth_when(["-q", "synthesize", str(ws["recipe"]), "--base-only", "--out", str(out)],
                       lambda: len(list((out / ".curate").rglob("batch-*.json"))) >= 2, env=env)
    assert not (out / "index.json").exists()
    scored = len(_records(out))
    assert scored >= 2
    synthesize.run(load_recipe(ws["recipe"]), out=out, base_only=True)
    # Scored candidates were not generated again; the result is the uninterrupted run's, byte for byte.
    assert synthesize.last_stats["generated"] == ws["ref_generated"] - scored
    assert _shard_bytes(out) == _shard_bytes(ws["ref"])
    a, b = (json.loads((d / "index.json").read_text()) for d in (out, ws["ref"]))
    assert a == b
    # A rerun of a complete curated synthesis generates nothing.
    synthesize.run(load_recipe(ws["recipe"]), out=out, base_only=True)
    assert synthesize.last_stats["generated"] == 0


def test_impossible_thresholds_fail_naming_the_class_and_the_keys(ws):
    from medsynth import synthesize
    from medsynth.recipe import load_recipe

    r = load_recipe(_write_recipe(ws, "strict.yaml", min_distance=2.0), ["synthesize.per_class=1",
                                                                         "synthesize.curate.oversample=1"])
    with pytest.raises(UserError) as e:
        synthesize.run(r, out=ws["tmp"] / "strict", base_only=True)
    msg = str(e.value)
    assert f"class '{CLASSES[0]}'" in msg and "synthesize.curate.min_distance 2.0" in msg
    assert "Relax synthesize.curate.min_score and/or synthesize.curate.min_distance" in msg


def test_curation_refuses_workers(ws):
    from medsynth import synthesize
    from medsynth.recipe import load_recipe

    with pytest.raises(UserError, match="curation picks the best candidates"):
        synthesize.run(load_recipe(ws["recipe"]), out=ws["tmp"] / "w", base_only=True, worker="0/2")


def test_pipeline_key_holds_the_judge_weights(ws, tmp_path):
    from medsynth import pipeline
    from medsynth.recipe import load_recipe

    r = load_recipe(ws["recipe"])
    weights = ws["workdir"] / "classify" / "real" / "model.safetensors"
    k1 = pipeline.stage_key(r, "synthesize")
    backup = weights.read_bytes()
    try:
        weights.write_bytes(backup + b" ")
        assert pipeline.stage_key(r, "synthesize") != k1
    finally:
        weights.write_bytes(backup)
    assert pipeline.stage_key(r, "synthesize") == k1
    off = load_recipe(ws["recipe"], ["synthesize.curate.enabled=false"])
    assert pipeline.stage_key(off, "synthesize") != k1
