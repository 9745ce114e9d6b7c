"""The `dit` family: a class-conditional DiT trained from scratch (tiny models, CPU, offline).

- medsynth's DPM-Solver++ sampler equals diffusers' DiTPipeline (same latents, labels, guidance, steps);
- the HLDF colour loss reaches the DiT's weights (label tables included);
- `medsynth run --set model.family=dit --set model.base=tiny` completes prepare -> score on a 3-class
  HyperKvasir subset, and resume after kill -9 equals the uninterrupted run (EMA included).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from _helpers import kill_medsynth_when
from conftest import ONE_THREAD, SHARED_DATA, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("polyps", "normal-cecum", "impacted-stool")


def _tiny_dit(num_classes: int, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    # learned sigma (out = 2 x in), as DiT; patch 2 over 8x8 latents = 16 tokens.
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes).eval()


def _tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


SCHED = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
             prediction_type="epsilon")


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_matches_ditpipeline(guidance):
    """DiTPipeline hard-codes the null class 1000, so the comparison model has 1000 classes.

    What DiTPipeline does differently, and why it still must agree: it draws the latents itself
    (one generator for the batch: the same draw as torch.randn with it), puts the conditional half
    first and steps the solver on both (identical) halves, and guides the first C channels only;
    medsynth drops the variance half before guiding. None of this changes the images.
    """
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    from medsynth.models import backbone, loading

    bb = backbone.get("dit")
    tr, vae = _tiny_dit(1000), _tiny_vae()
    sched = DPMSolverMultistepScheduler(**SCHED)
    pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 999]
    want = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=6,
                generator=torch.Generator().manual_seed(7), output_type="np", return_dict=False)[0]

    comps = loading.Components(family="dit", transformer=tr, vae=vae, scheduler=sched)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    cond = bb.encode(comps, ["", ""], 0, "cpu", labels=labels)
    neg = bb.encode(comps, ["", ""], 0, "cpu", labels=[None, None])
    assert neg["labels"].tolist() == [1000, 1000]  # the null label = num_embeds_ada_norm
    got = bb.pipeline_generate(bb.stock_pipeline(comps, bb.sampling_scheduler(sched.config)), cond, neg, latents,
                               steps=6, guidance=guidance, resolution=16)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert abs(got - want).max() <= 1e-4
    assert abs(want[0] - want[1]).max() > 1e-3  # the labels matter


def test_hldf_colour_gradient_reaches_the_dit():
    from medsynth.finetune import hldf
    from medsynth.models import backbone, loading
    from medsynth.models.dit import no_label_dropout
    from medsynth.recipe import load_recipe

    bb = backbone.get("dit")
    tr, vae = no_label_dropout(_tiny_dit(3)), _tiny_vae().requires_grad_(False)
    tr.train()
    comps = loading.Components(family="dit", transformer=tr, vae=vae)
    hc = load_recipe("demo", ["finetune.hldf.steps=2"]).finetune.hldf
    cond = bb.encode(comps, ["", ""], 0, "cpu", labels=[0, 2])
    neg = bb.encode(comps, ["", ""], 0, "cpu", labels=[None, None])
    r = hldf.hldf_step(bb, tr, vae, {"_class_name": "DDPMScheduler", **SCHED}, hc, cond, neg,
                       torch.zeros(2, 3), torch.full((2, 3), 0.5), torch.Generator().manual_seed(0), (2, 4, 8, 8))
    r.loss.backward()
    no_grad = [n for n, p in tr.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    table = tr.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.weight.shape[0] == 4  # 3 classes + the null class
    used = table.weight.grad.abs().sum(-1)
    assert (used[[0, 2, 3]] > 0).all() and used[1] == 0  # labels 0, 2 and the null label (CFG)


# ----------------------------------------------------------------------------- CLI, real data


def _sets(tmp: Path, data: Path, **extra) -> list[str]:
    kv = {"data.root": str(data), "workdir": str(tmp / "ws"), "model.family": "dit", "model.base": "tiny",
          "model.resolution": 32, "model.tiny.autoencoder": "fitted", "model.tiny.vae_fit_steps": 0,
          "model.tiny.layers": 2, "model.tiny.heads": 2, "model.tiny.head_dim": 8,
          "model.tiny.vae_channels": "[8,16]", "modality": "endoscopic", "finetune.batch_size": 4,
          "finetune.caption_dropout": 0.2, "finetune.hldf.every_n_steps": 4, "finetune.hldf.steps": 3,
          "finetune.checkpoint_every": 3, "finetune.sample_every": 4, "finetune.log_every": 1,
          "finetune.samples_per_class": 2, "synthesize.steps": 4, "synthesize.per_class": 4,
          "classify.epochs": 1}
    kv.update(extra)
    return [x for k, v in kv.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dit")
    data = tmp / "data"
    for c in CLASSES:
        (data / c).mkdir(parents=True)
        for f in sorted((SHARED_DATA / "hyperkvasir" / c).iterdir())[:6]:
            (data / c / f.name).symlink_to(f.resolve())
    r = run_cli("prepare", "demo", *_sets(tmp, data), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    # Build the tiny base once here, so every CLI run below loads the same cached base.
    from medsynth.models.loading import resolve_base
    from medsynth.recipe import load_recipe

    resolve_base(load_recipe("demo", [x for x in _sets(tmp, data) if x != "--set"]))
    return tmp, data


def _log(ws: Path) -> list[dict]:
    return [json.loads(x) for x in (ws / "finetune" / "log.jsonl").read_text().splitlines() if x.strip()]


def test_tiny_dit_base_layout_loads_back(prepared):
    from diffusers import DiTPipeline
    from diffusers.models.embeddings import LabelEmbedding

    from medsynth.errors import UserError
    from medsynth.models import backbone, loading
    from medsynth.recipe import load_recipe

    tmp, data = prepared
    recipe = load_recipe("demo", [x for x in _sets(tmp, data) if x != "--set"])
    base = Path(loading.resolve_base(recipe))
    assert base.parent.name == "tiny-base" and base.name.startswith("dit-")
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    names = json.loads((tmp / "ws" / "classes.json").read_text())["classes"]
    assert index["id2label"] == {str(c["index"]): c["name"] for c in names}
    comps = loading.load_components(recipe, device="cpu", dtype=torch.float32)
    assert comps.family == "dit" and comps.transformer.config.num_embeds_ada_norm == 3
    tables = [m for m in comps.transformer.modules() if isinstance(m, LabelEmbedding)]
    assert tables and all(m.dropout_prob == 0 and m.embedding_table.num_embeddings == 4 for m in tables)
    pipe = DiTPipeline.from_pretrained(str(base))  # the stock loader reads the layout and the labels
    assert pipe.get_label_ids(["polyps"]) == [next(c["index"] for c in names if c["name"] == "polyps")]
    bb = backbone.for_recipe(recipe)
    assert bb.encode(comps, ["a", "b"], 0, "cpu", labels=[1, None])["labels"].tolist() == [1, 3]
    with pytest.raises(UserError, match="finetune.adapter"):
        bb.lora_targets("denoiser", "paper")


def test_lora_and_dry_run_are_user_errors(prepared):
    tmp, data = prepared
    r = run_cli("finetune", "demo", "--max-steps", "1", *_sets(tmp, data, **{"finetune.adapter": "lora"}), env=ONE_THREAD)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "finetune.adapter: full" in r.stderr
    r = run_cli("finetune", "demo", "--dry-run", *_sets(tmp, data), env=ONE_THREAD)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--dry-run estimates only a DiT conditioned by one T5 text encoder in this version, not model.family 'dit'" in r.stderr


def test_run_prepare_to_score(prepared):
    import webdataset as wds

    tmp, data = prepared
    ws = tmp / "ws"
    r = run_cli("run", "demo", "--json", "-q", *_sets(tmp, data, **{"finetune.max_steps": 8}), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    info = json.loads((ws / "finetune" / "final" / "adapter.json").read_text())
    assert info["family"] == "dit" and info["kind"] == "full" and info["text_encoders"] == []
    log = _log(ws)
    assert [x["step"] for x in log if "loss/color_mean" in x] == [4, 8]
    assert all(x["loss/color_std"] >= 0 and x["loss/hldf"] > 0 for x in log if "loss/hldf" in x)
    shards = sorted((ws / "synthetic").glob("*.tar"))
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    classes = json.loads((ws / "classes.json").read_text())["classes"]
    assert len(samples) == 4 * len(classes)
    for s in samples:
        meta = s["json"]
        assert int(s["cls"]) == meta["cls"] and classes[meta["cls"]]["name"] == meta["label"]
        assert s["png"].size == (32, 32)
    assert (ws / "score" / "scores.json").is_file()


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(prepared):
    """6 steps in one go == kill -9 after the step-3 checkpoint + --resume to 6 (EMA weights, losses)."""
    from safetensors.torch import load_file

    tmp, data = prepared
    ws = tmp / "ws"
    sets = _sets(tmp, data, **{"finetune.sample_every": 1000})
    final = "transformer/diffusion_pytorch_model.safetensors"
    r = run_cli("finetune", "demo", "--max-steps", "6", *sets, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    want = load_file(str(ws / "finetune" / "final" / final))
    want_log = _log(ws)
    # The final model is the EMA of the weights, not the last raw weights.
    raw = load_file(str(ws / "finetune" / "checkpoints" / "step-0000006" / "trainable.safetensors"))
    ema = torch.load(ws / "finetune" / "checkpoints" / "step-0000006" / "ema.pt", weights_only=True)
    k = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(ws / "finetune" / "final" / "transformer"))
    i = [n for n, _ in model.named_parameters()].index(k)  # EMA shadows follow the parameter order
    torch.testing.assert_close(want[k], ema["shadow_params"][i].float(), rtol=0, atol=0)
    assert (want[k] - raw["transformer." + k]).abs().max() > 1e-6
    shutil.move(ws / "finetune", tmp / "finetune-uninterrupted")

    env = {**os.environ, **ONE_THREAD}
    ck3 = ws / "finetune" / "checkpoints" / "step-0000003" / "state.json"
    kill_medsynth_when(["finetune", "demo", "--max-steps", "1000", *sets], ck3.is_file, env=env, timeout=300, poll=0.01)
    assert sorted(p.name for p in (ws / "finetune" / "checkpoints").glob("step-*")) == ["step-0000003"]

    r = run_cli("finetune", "demo", "--resume", "--max-steps", "6", *sets, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 3)" in r.stderr
    got = load_file(str(ws / "finetune" / "final" / final))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    got_log = _log(ws)
    assert [x["step"] for x in got_log] == list(range(1, 7))
    for a, b in zip(want_log, got_log):
        assert a["loss/diffusion"] == pytest.approx(b["loss/diffusion"], abs=1e-6)
        assert a.get("loss/color_mean", 0) == pytest.approx(b.get("loss/color_mean", 0), abs=1e-6)
