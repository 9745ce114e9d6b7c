"""`medsynth finetune` end to end with the tiny base on a HyperKvasir subset: outputs, falling loss,
and exact resume after kill -9."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _helpers import TINY_FT_MODEL, kill_medsynth_when, link_subset, set_args


def _subset(src: Path, dst: Path, classes=("polyps", "normal-cecum", "impacted-stool"), per_class=6) -> Path:
    return link_subset(src, dst, classes, per_class)


# A smaller tiny base than the demo's (TINY_FT_MODEL), VAE left unfitted: these tests are about the training mechanics.
FT = {"model.tiny.autoencoder": "fitted", "modality": "endoscopic", "finetune.batch_size": 4,
      "finetune.learning_rate": 2e-3, "finetune.hldf.every_n_steps": 4, "finetune.hldf.steps": 3,
      "finetune.checkpoint_every": 3, "finetune.sample_every": 1000, "finetune.log_every": 1,
      "finetune.samples_per_class": 2, "synthesize.steps": 4}


def _sets(tmp: Path, data: Path, **extra) -> list[str]:
    return set_args(tmp, data, TINY_FT_MODEL, FT, extra)


def _read_log(ws: Path) -> list[dict]:
    return [json.loads(x) for x in (ws / "finetune" / "log.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture
def prepared(tmp_path, shared_data, cli):
    data = _subset(shared_data / "hyperkvasir", tmp_path / "data")
    r = cli("prepare", "demo", *_sets(tmp_path, data))
    assert r.returncode == 0, r.stderr
    # Build the tiny base here, so every CLI run below loads the same cached base. (A process that
    # has just built it computes the first steps ~1e-6 differently on the CPU, which the exact
    # resume comparison would otherwise pick up.)
    from medsynth.models.loading import resolve_base
    from medsynth.recipe import load_recipe

    resolve_base(load_recipe("demo", [x for x in _sets(tmp_path, data) if x != "--set"]))
    return tmp_path, data


def test_finetune_end_to_end(prepared, cli):
    tmp, data = prepared
    ws = tmp / "ws"
    r = cli("--json", "finetune", "demo", "--max-steps", "16", *_sets(tmp, data, **{"finetune.sample_every": 8}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "captions.jsonl not found" in r.stderr  # no caption stage ran: simple captions, said so
    res = json.loads(r.stdout)
    assert res["steps"] == 16 and res["adapter"] == "full"
    ft = ws / "finetune"
    for p in ("config.yaml", "provenance.json", "log.jsonl", "samples/step-0000008.png", "samples/step-0000016.png",
              "final/adapter.json", "final/transformer/config.json", "final/text_encoder/adapter_config.json"):
        assert (ft / p).is_file(), p
    assert not (ft / "final" / "pytorch_lora_weights.safetensors").exists()  # no diffusers loader reads it for PixArt
    assert any((ft / "tensorboard").iterdir())
    assert [p.name for p in sorted((ft / "checkpoints").iterdir())] == [f"step-{s:07d}" for s in (12, 15, 16)]
    log = _read_log(ws)
    assert [x["step"] for x in log] == list(range(1, 17))
    first = sum(x["loss/diffusion"] for x in log[:4]) / 4
    last = sum(x["loss/diffusion"] for x in log[-4:]) / 4
    assert last < 0.9 * first, (first, last)  # deterministic on CPU: 1.28 -> 1.05 when written
    colour_steps = [x["step"] for x in log if "loss/color_mean" in x]
    assert colour_steps == [4, 8, 12, 16]
    assert all(x["loss/color_std"] >= 0 and x["loss/hldf"] > 0 for x in log if "loss/hldf" in x)

    from PIL import Image

    grid = Image.open(ft / "samples" / "step-0000016.png")
    assert grid.size == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2)  # 3 classes x 2 samples, 2 px padding
    info = json.loads((ft / "final" / "adapter.json").read_text())
    assert info["kind"] == "full" and info["step"] == 16 and info["text_encoder"] is True

    # The adapters load onto the base and change what the model computes.
    from medsynth.finetune.adapters import apply_finetuned
    from medsynth.models import loading
    from medsynth.recipe import load_recipe

    recipe = load_recipe("demo", [s for s in _sets(tmp, data) if s != "--set"])
    base = loading.load_components(recipe, device="cpu", dtype=torch.float32)
    x = torch.randn(1, base.transformer.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx, mask = torch.randn(1, 8, base.text_encoder.config.d_model), torch.ones(1, 8, dtype=torch.long)
    from medsynth.models.pixart import predict_noise

    with torch.no_grad():
        before = predict_noise(base.transformer, x, torch.tensor([500]), ctx, mask)
        ids = torch.tensor([[5, 6, 7, 1]])
        t5_before = base.text_encoder(ids)[0]
        tuned = apply_finetuned(base, ft)
        after = predict_noise(tuned.transformer, x, torch.tensor([500]), ctx, mask)
        t5_after = tuned.text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-3
    assert (t5_after - t5_before).abs().max() > 1e-6


def test_resume_after_kill_matches_uninterrupted_run(prepared, cli):
    """6 steps in one go == kill -9 after the step-3 checkpoint + --resume to 6 (tolerance 1e-6; exact on CPU)."""
    from safetensors.torch import load_file

    tmp, data = prepared
    ws = tmp / "ws"
    sets = _sets(tmp, data)
    r = cli("finetune", "demo", "--max-steps", "6", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    want = {k: load_file(str(ws / "finetune" / "final" / k)) for k in
            ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/adapter_model.safetensors")}
    want_log = _read_log(ws)
    shutil.move(ws / "finetune", tmp / "finetune-uninterrupted")  # so only the new run's checkpoints are seen

    # A long run (constant LR, so its length does not change the first 6 steps), killed hard as soon
    # as the step-3 checkpoint is complete.
    ck3 = ws / "finetune" / "checkpoints" / "step-0000003" / "state.json"
    kill_medsynth_when(["finetune", "demo", "--max-steps", "1000", *sets], ck3.is_file, poll=0.01)
    assert not (ws / "finetune" / "final").exists()
    done = sorted(p.name for p in (ws / "finetune" / "checkpoints").glob("step-*"))
    assert done == ["step-0000003"], done  # killed before the next checkpoint: resume really restarts at 3

    r = cli("finetune", "demo", "--resume", "--max-steps", "6", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "(step 3)" in r.stderr
    got = {k: load_file(str(ws / "finetune" / "final" / k)) for k in want}
    for f in want:
        assert want[f].keys() == got[f].keys()
        for k in want[f]:
            torch.testing.assert_close(got[f][k], want[f][k], rtol=0, atol=1e-6)
    got_log = _read_log(ws)
    assert [x["step"] for x in got_log] == list(range(1, 7))
    for a, b in zip(want_log, got_log):
        assert a["loss/diffusion"] == pytest.approx(b["loss/diffusion"], abs=1e-6)
        assert a.get("loss/color_mean", 0) == pytest.approx(b.get("loss/color_mean", 0), abs=1e-6)


    # Resuming with other adapter settings is refused with a message naming the key.
    r = cli("finetune", "demo", "--resume", "--max-steps", "7", *_sets(tmp, data, **{"finetune.lora.rank": 4}))
    assert r.returncode == 1
    assert "finetune.lora" in r.stderr and "Traceback" not in r.stderr


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(prepared, cli):
    tmp, data = prepared
    # An absurd learning rate blows the weights up after the first update; step 2's loss is NaN.
    r = cli("finetune", "demo", "--max-steps", "4",
            *_sets(tmp, data, **{"finetune.learning_rate": 1e30, "finetune.checkpoint_every": 1}))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "the loss became" in r.stderr and "at step 2" in r.stderr and "step-0000001" in r.stderr
    ckpts = sorted(p.name for p in (tmp / "ws" / "finetune" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000001"]
    assert not (tmp / "ws" / "finetune" / "final").exists()
