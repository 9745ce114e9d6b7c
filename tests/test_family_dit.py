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

import numpy as np
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


# ----------------------------------------------------------------------------- finetune.ema_decay / label_dropout


def _recipe(tmp: Path, data: Path, **extra):
    from medsynth.recipe import load_recipe

    return load_recipe("demo", [x for x in _sets(tmp, data, **extra) if x != "--set"])


def _finetune_in_process(tmp: Path, data: Path, monkeypatch, **extra) -> list[torch.Tensor]:
    """2 optimizer steps in this process; returns the class labels every training prediction saw."""
    from medsynth import finetune
    from medsynth.models.dit import DiTBackbone

    seen: list[torch.Tensor] = []
    predict = DiTBackbone.predict

    def spy(self, denoiser, latents, t, cond, pixel_size=None):
        if torch.is_grad_enabled():  # a training step (sample grids run under no_grad)
            seen.append(cond["labels"].detach().cpu().clone())
        return predict(self, denoiser, latents, t, cond, pixel_size)

    monkeypatch.setattr(DiTBackbone, "predict", spy)
    # HLDF off (it predicts with gradients too); the final sample grid runs under no_grad.
    settings = {"finetune.hldf.enabled": "false", "finetune.sample_every": 1000, "finetune.checkpoint_every": 2,
                "workdir": str(tmp / "ws"), **extra}
    finetune.run(_recipe(tmp, data, **settings), max_steps=2)
    return seen


def _copy_prepared(prepared, tmp_path: Path) -> Path:
    src, _ = prepared
    shutil.copytree(src / "ws", tmp_path / "ws", ignore=shutil.ignore_patterns("finetune", "synth*", "classify*", "score*"))
    return tmp_path


def test_label_dropout_one_conditions_every_training_step_on_the_null_class(prepared, tmp_path, monkeypatch):
    _, data = prepared
    tmp = _copy_prepared(prepared, tmp_path)
    # finetune.caption_dropout (0.2 in _sets) is what label_dropout null falls back to: some, not all, dropped.
    labels = torch.cat(_finetune_in_process(tmp, data, monkeypatch, **{"finetune.caption_dropout": 0.0}))
    assert labels.numel() == 2 * 4 and (labels < 3).all()  # batch 4, 2 steps, no null label at all
    labels = torch.cat(_finetune_in_process(tmp, data, monkeypatch, **{"finetune.caption_dropout": 0.0,
                                                                        "finetune.label_dropout": 1.0}))
    assert labels.numel() == 8 and (labels == 3).all()  # every label is the null class K = 3
    # label_dropout overrides caption_dropout for a class-conditional family.
    labels = torch.cat(_finetune_in_process(tmp, data, monkeypatch, **{"finetune.caption_dropout": 1.0,
                                                                        "finetune.label_dropout": 0.0}))
    assert (labels < 3).all()


def test_ema_decay_sets_the_decay_of_the_final_model(prepared, tmp_path, monkeypatch):
    """The final model is the EMA. With finetune.ema_decay 0 the EMA is the raw weights; the default
    (0.9999, warmed up as min(decay, (1+n)/(10+n))) keeps part of the step-1 weights.

    A decay of 0.5 would not show it in 2 steps: the warm-up caps the decay at (1+n)/(10+n) < 0.5 for
    n < 8, so every decay >= 0.5 gives the same first 8 EMA steps."""
    from safetensors.torch import load_file

    _, data = prepared
    tmp = _copy_prepared(prepared, tmp_path)
    ws = tmp / "ws" / "finetune"
    final = {}
    for decay in (None, 0.0):
        extra = {} if decay is None else {"finetune.ema_decay": decay}
        _finetune_in_process(tmp, data, monkeypatch, **extra)
        raw = load_file(str(ws / "checkpoints" / "step-0000002" / "trainable.safetensors"))
        got = load_file(str(ws / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
        diff = max((got[k] - raw["transformer." + k]).abs().max().item() for k in got)
        final[decay] = diff
    assert final[0.0] <= 1e-6, final
    assert final[None] > 1e-5, final


def test_ema_and_label_dropout_keys_fail_for_families_that_do_not_read_them(prepared):
    from medsynth.errors import UserError
    from medsynth.finetune.loop import _check_family_keys
    from medsynth.models import backbone
    from medsynth.recipe import load_recipe

    for fam in ("pixart", "hunyuan-dit", "sd"):
        bb = backbone.get(fam)
        with pytest.raises(UserError, match=r"finetune\.ema_decay is 0\.5 .*'" + fam + "'"):
            _check_family_keys(bb, load_recipe("demo", ["finetune.ema_decay=0.5"]).finetune)
        with pytest.raises(UserError, match=r"finetune\.label_dropout is 0\.1 .*finetune\.caption_dropout"):
            _check_family_keys(bb, load_recipe("demo", ["finetune.label_dropout=0.1"]).finetune)
        _check_family_keys(bb, load_recipe("demo", []).finetune)  # null: no error
    _check_family_keys(backbone.get("dit"), load_recipe("demo", ["finetune.ema_decay=0.5",
                                                                 "finetune.label_dropout=0.1"]).finetune)
    # Out of range values are recipe errors naming the key, the value and the bound.
    for bad, msg in [("finetune.ema_decay=1.0", r"finetune\.ema_decay: 1\.0 is out of range; it must be less than 1\.0"),
                     ("finetune.ema_decay=-0.5", r"finetune\.ema_decay: -0\.5 is out of range"),
                     ("finetune.label_dropout=1.5", r"finetune\.label_dropout: 1\.5 is out of range; it must be at most 1\.0")]:
        with pytest.raises(UserError, match=msg):
            load_recipe("demo", [bad])


def test_resume_refuses_a_changed_ema_decay_or_label_dropout(prepared, tmp_path, monkeypatch):
    """Both keys change what a resumed run computes, so a checkpoint made with other values is refused."""
    from medsynth import finetune
    from medsynth.errors import UserError

    _, data = prepared
    tmp = _copy_prepared(prepared, tmp_path)
    _finetune_in_process(tmp, data, monkeypatch)  # checkpoint at step 2 with both keys null
    base = {"finetune.hldf.enabled": "false", "finetune.sample_every": 1000, "finetune.checkpoint_every": 2,
            "workdir": str(tmp / "ws")}
    for key, value in (("finetune.ema_decay", 0.5), ("finetune.label_dropout", 0.3)):
        with pytest.raises(UserError, match=rf"cannot resume from .*step-0000002: {key} was None there and is {value} now"):
            finetune.run(_recipe(tmp, data, **base, **{key: value}), resume=True, max_steps=3)


# ----------------------------------------------------------------------------- DiT-S/8 at its real size


def test_dit_s8_at_256px_with_the_sd_vae_trains_one_step_and_samples(tmp_path):
    """DiT-S/8 is small, so it is checked at its real size: hidden 384 (6 x 64), depth 12, patch 8 over the
    32 x 32 x 4 latents of the SD VAE at 256 px (the DiT paper's setting; dit_s8_config's default), saved
    with dit.save_base, loaded by medsynth's loader, one training step and one guided sample through the
    backbone's encode / predict / training target / pipeline_generate."""
    import real_shaped
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from medsynth import sampling
    from medsynth.models import backbone, dit, loading
    from medsynth.recipe import load_recipe

    names = ["polyps", "normal-cecum", "impacted-stool"]
    torch.manual_seed(0)
    tr = DiTTransformer2DModel(**dit.dit_s8_config(len(names)))
    torch.manual_seed(1)
    vae = AutoencoderKL(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in real_shaped.VAE_CONFIG.items()})
    base = dit.save_base(tmp_path / "dit-s8", tr, vae, names)
    del tr, vae
    r = load_recipe("demo", [f"model.base={base}", f"workdir={tmp_path / 'ws'}", "model.resolution=256",
                             "model.dtype=fp32", "model.device=cpu"])
    assert backbone.family_of(r) == "dit"
    bb = backbone.for_recipe(r)
    c = loading.load_components(r, device="cpu", dtype=torch.float32)
    cfg = c.transformer.config
    assert (cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers, cfg.num_attention_heads,
            cfg.patch_size, cfg.sample_size, cfg.in_channels, cfg.out_channels) == (384, 12, 6, 8, 32, 4, 8)
    assert 30e6 < sum(p.numel() for p in c.transformer.parameters()) < 36e6  # DiT-S/8: ~33M parameters
    assert len(c.transformer.transformer_blocks) == 12 and bb.vae_scale(c.vae) == 8

    # One training step (as the loop: VAE latents, DDPM noise, MSE on the first C channels).
    img = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    with torch.no_grad():
        z0 = c.vae.encode(img).latent_dist.mean * c.vae.config.scaling_factor
    assert z0.shape == (1, 4, 32, 32)
    tr = c.transformer.train().requires_grad_(True)
    train_sched = bb.training_scheduler(c.scheduler.config)
    g = torch.Generator().manual_seed(3)
    noise, t = torch.randn(z0.shape, generator=g), torch.tensor([500])
    cond = bb.encode(c, [""], 0, "cpu", labels=[1])
    pred = bb.predict(tr, train_sched.add_noise(z0, noise, t), t, cond, (256, 256))
    assert pred.shape == z0.shape
    loss = torch.nn.functional.mse_loss(pred, sampling.training_target(train_sched, z0, noise, t))
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-4)
    loss.backward()
    table = tr.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.weight.grad[1].abs().sum() > 0 and table.weight.grad[0].abs().sum() == 0
    before = tr.proj_out_2.weight.detach().clone()
    opt.step()
    assert (tr.proj_out_2.weight - before).abs().max() > 0
    tr.eval()

    # One guided sample at 256 px through the synthesis path.
    neg = bb.encode(c, [""], 0, "cpu", labels=[None])
    pipe = bb.stock_pipeline(c, bb.sampling_scheduler(c.scheduler.config))
    lat = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(4))
    out = bb.pipeline_generate(pipe, cond, neg, lat, steps=2, guidance=4.0, resolution=256)
    assert out.shape == (1, 256, 256, 3) and np.isfinite(out).all() and out.std() > 0
