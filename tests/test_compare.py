"""`medsynth compare`: variants of one base recipe in one command, with prepare/caption shared, reruns that
skip finished variants, failures recorded per row, and report.md / table.csv / samples.png.

Tiny settings on 3 HyperKvasir classes; the CLI is driven in-process (medsynth.cli.main) where stage
executions are counted, and as a subprocess where it is killed mid-way.
"""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image

from _helpers import kill_medsynth_when, link_subset, shared_data_dir

CLASSES = ["bbps-0-1", "normal-cecum", "polyps"]
FAST = {
    "model.tiny.vae_fit_steps": 2, "finetune.max_steps": 2, "finetune.sample_every": 1000,
    "finetune.checkpoint_every": 1000, "synthesize.per_class": 2, "synthesize.steps": 2,
    "classify.epochs": 1, "classify.batch_size": 8, "classify.image_size": 32,
    "score.kid_subset_size": 4, "score.kid_subsets": 2,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return link_subset(shared_data_dir() / "hyperkvasir", tmp_path_factory.mktemp("kv") / "data", CLASSES, 5)


def _spec(path, data, variants):
    path.write_text(yaml.safe_dump({"base": "demo", "set": {"data.root": str(data), **FAST}, "variants": variants}))
    return path


@pytest.fixture(scope="module")
def counted(data, tmp_path_factory):
    """One compare of 4 variants (two caption settings, one broken base model), stage executions counted."""
    from medsynth import caption, cli
    from medsynth import data as data_mod

    tmp = tmp_path_factory.mktemp("cmp")
    calls = {"prepare": 0, "caption": 0}
    orig = {"prepare": data_mod.run, "caption": caption.run}

    def counting(stage):
        def f(*a, **k):
            calls[stage] += 1
            return orig[stage](*a, **k)
        return f

    mp = pytest.MonkeyPatch()
    mp.setattr(data_mod, "run", counting("prepare"))
    mp.setattr(caption, "run", counting("caption"))
    spec = _spec(tmp / "spec.yaml", data, {
        "base": {},
        "no-hldf": {"finetune.hldf.enabled": False},
        "empty-captions": {"caption.source": "empty"},
        "broken": {"model.base": str(tmp / "no-such-model")},
    })
    out = tmp / "out"
    try:
        rc = cli.main(["compare", str(spec), "--out", str(out), "-q"])
    finally:
        mp.undo()
    return {"rc": rc, "calls": calls, "out": out, "spec": spec}


def test_prepare_once_and_caption_once_per_caption_setting(counted):
    # 4 variants, one data set: one prepare. The caption key is the caption settings plus model.base (its
    # tokenizer counts the tokens): 'simple'+tiny (base, no-hldf), 'empty'+tiny, 'simple'+broken: three runs.
    assert counted["calls"] == {"prepare": 1, "caption": 3}
    shared = counted["out"] / "_shared"
    assert len(list(shared.glob("prepare-*/manifest.csv"))) == 1
    assert len(list(shared.glob("caption-*/captions.jsonl"))) == 2  # the broken variant's caption run failed
    base, nohldf = counted["out"] / "base", counted["out"] / "no-hldf"
    assert (base / "captions.jsonl").read_bytes() == (nohldf / "captions.jsonl").read_bytes()
    assert '"source": "empty"' in (counted["out"] / "empty-captions" / "captions.jsonl").read_text()
    # the variants' own stages.json hold the shared keys: `medsynth run` in a variant skips prepare and caption
    from medsynth import pipeline
    from medsynth.recipe import load_recipe

    rerun = pipeline.run(load_recipe(base / "recipe.yaml"))
    assert {r.stage: r.status for r in rerun} == {s: "skipped" for s in pipeline.STAGES}
    status = json.loads((shared / "status" / "base.json").read_text())
    assert status["runs"]["prepare"] == "shared" and status["runs"]["finetune"] == "ran"


def test_failed_variant_is_a_row_and_exit_code_1(counted):
    assert counted["rc"] == 1
    rows = {r["variant"]: r for r in csv.DictReader(open(counted["out"] / "table.csv"))}
    assert rows["broken"]["status"] == "failed" and "no-such-model" in rows["broken"]["error"]
    for name in ("base", "no-hldf", "empty-captions"):
        assert rows[name]["status"] == "done", rows[name]["error"]
        assert float(rows[name]["balanced_accuracy"]) >= 0 and rows[name]["kid_domain_mean"] != ""
        assert rows[name]["colour_mean_abs_diff"] != "" and rows[name]["memorization_fraction"] != ""
        assert rows[name]["seconds_finetune"] != ""
    assert rows["real-only (reference)"]["balanced_accuracy"] != ""
    report = (counted["out"] / "report.md").read_text()
    assert "## Failed variants" in report and "**" in report


def test_samples_png_is_classes_by_variants(counted):
    from medsynth.compare import CELL, HEADER_H, LABEL_W

    with Image.open(counted["out"] / "samples.png") as im:
        assert im.size == (LABEL_W + CELL * (1 + 4), HEADER_H + CELL * len(CLASSES))
    assert (counted["out"] / "recall.png").is_file()


def test_spec_errors_name_the_variant(data, tmp_path):
    from medsynth.cli import main

    spec = _spec(tmp_path / "spec.yaml", data, {"ok": {}, "typo": {"finetune.max_stepz": 3}})
    assert main(["compare", str(spec), "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()  # validated before any work


@pytest.mark.parametrize("name", ["demo-compare", "paper-table2", "paper-table3"])
def test_builtin_specs_are_valid(name, tmp_path):
    from medsynth.compare import load_spec

    spec = load_spec(name, tmp_path / "out", ["data.root=/data/x"])
    assert len(spec.variants) >= 6
    assert {v.recipe.workdir for v in spec.variants} == {str((tmp_path / "out" / v.name).resolve()) for v in spec.variants}
    if name == "demo-compare":
        assert {v.recipe.model.family or "pixart" for v in spec.variants} == {"pixart", "sd", "sdxl", "hunyuan-dit", "dit"}
        assert all(v.recipe.model.base == "tiny" and v.recipe.model.device == "cpu" for v in spec.variants)


# Slow: it races a kill -9 against a subprocess; one unexplained failure in ~17 runs of this file was seen
# (cause not found yet), so it runs with the slow tests before a release rather than in every CI run.
@pytest.mark.slow
def test_killed_compare_reruns_without_redoing_finished_variants(data, tmp_path):
    from medsynth.cli import main

    spec = _spec(tmp_path / "spec.yaml", data, {"first": {}, "second": {"finetune.hldf.enabled": False}})
    out = tmp_path / "out"
    status = out / "_shared" / "status"

    def second_started():
        try:
            return json.loads((status / "first.json").read_text())["status"] == "done" and (status / "second.json").is_file()
        except (OSError, ValueError, KeyError):
            return False

    kill_medsynth_when(["compare", str(spec), "--out", str(out), "-q"], second_started, timeout=240)
    first_ft = (out / "first" / "finetune" / "provenance.json").stat().st_mtime_ns
    prepared = next((out / "_shared").glob("prepare-*/prepare/provenance.json")).stat().st_mtime_ns
    assert main(["compare", str(spec), "--out", str(out), "-q"]) == 0
    first = json.loads((status / "first.json").read_text())
    assert set(first["runs"].values()) <= {"skipped", "shared"}, first["runs"]
    assert (out / "first" / "finetune" / "provenance.json").stat().st_mtime_ns == first_ft
    assert next((out / "_shared").glob("prepare-*/prepare/provenance.json")).stat().st_mtime_ns == prepared
    assert json.loads((status / "second.json").read_text())["status"] == "done"


def test_worker_runs_variant_k_when_k_mod_n_is_i(data, tmp_path, monkeypatch):
    from medsynth import compare
    from medsynth.errors import UserError

    spec = _spec(tmp_path / "spec.yaml", data, {f"v{k}": {} for k in range(5)})
    ran = []
    monkeypatch.setattr(compare, "run_variant", lambda v, out: ran.append(v.name))
    monkeypatch.setattr(compare, "write_report", lambda spec, out: {})
    compare.run(str(spec), tmp_path / "out", worker="1/2")
    assert ran == ["v1", "v3"]
    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match="--worker"):
            compare.parse_worker(bad)
