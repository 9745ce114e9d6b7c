"""`medsynth run`: every stage in order; unchanged stages are skipped; a changed setting re-runs
that stage and the ones after it only. Driven through the real CLI with tiny settings."""

from __future__ import annotations

import json

import pytest

from medsynth import demo_data

FAST = [
    "model.tiny.vae_fit_steps=2", "finetune.max_steps=2", "finetune.sample_every=1000",
    "finetune.checkpoint_every=1000", "synthesize.per_class=2", "synthesize.steps=2",
    "classify.epochs=1", "classify.batch_size=8", "classify.image_size=32",
    "score.kid_subset_size=4", "score.kid_subsets=2",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return demo_data.generate(tmp_path_factory.mktemp("toy") / "data", n_per_class=5, size=64)


def _run(cli, toy, ws, *extra):
    args = ["run", "demo", "--json", "-q", "--set", f"data.root={toy}", "--set", f"workdir={ws}"]
    for s in FAST + list(extra):
        args += ["--set", s]
    r = cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {k: v["status"] for k, v in json.loads(r.stdout)["stages"].items()}


def test_run_skips_unchanged_and_reruns_downstream_of_a_change(cli, toy, tmp_path):
    ws = tmp_path / "ws"
    stages = ["prepare", "caption", "finetune", "synthesize", "classify", "score"]
    assert _run(cli, toy, ws) == {s: "ran" for s in stages}
    for s in ("synthetic/index.json", "classify/synthetic/metrics.json", "classify/real/metrics.json", "score/scores.json"):
        assert (ws / s).is_file(), s
    mtime = (ws / "finetune" / "provenance.json").stat().st_mtime_ns

    assert _run(cli, toy, ws) == {s: "skipped" for s in stages}

    changed = _run(cli, toy, ws, "synthesize.per_class=3")
    assert changed == {"prepare": "skipped", "caption": "skipped", "finetune": "skipped",
                       "synthesize": "ran", "classify": "ran", "score": "ran"}
    assert (ws / "finetune" / "provenance.json").stat().st_mtime_ns == mtime
    index = json.loads((ws / "synthetic" / "index.json").read_text())
    assert index["counts"] == {c: 3 for c in index["class_to_index"]} and index["total"] == 3 * 4


def test_run_rejects_unknown_stage(cli, toy, tmp_path):
    r = cli("run", "demo", "--only", "sample", "--set", f"data.root={toy}", "--set", f"workdir={tmp_path / 'ws'}")
    assert r.returncode == 1
    assert "--only 'sample': not a stage" in r.stderr and "Traceback" not in r.stderr
