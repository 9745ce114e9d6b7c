"""The `hunyuan-dit` family on its tiny base: layout, sampler parity with HunyuanDiTPipeline
(use_resolution_binning=False), HLDF gradients into the DiT LoRA, `medsynth run` through score with
the text encoders frozen, and medsynth.load_finetuned on a stock HunyuanDiTPipeline."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from _family import assert_stock_parity, cli_env, family_recipe, load_comps, prepare_family_base, synthesized
from conftest import run_cli
from test_finetune_cli import _read_log, _sets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# TAEF2: HunyuanDiTPipeline assumes an x8 autoencoder (token grid = height // 8).
HY = {"model.family": "hunyuan-dit", "model.tiny.autoencoder": "taef2", "finetune.adapter": "lora",
      "model.tiny.heads": 2, "model.tiny.head_dim": 8, "model.tiny.text_dim": 32, "synthesize.per_class": 2,
      "synthesize.steps": 3, "classify.epochs": 1, "classify.image_size": 32, "classify.batch_size": 8}


_env = cli_env
_comps = load_comps


def _recipe(tmp: Path, data: Path, **extra):
    return family_recipe(tmp, data, HY, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A prepared 3-class HyperKvasir subset and its tiny Hunyuan-DiT base (built once for the module)."""
    return prepare_family_base(tmp_path_factory, "hunyuan", HY)


def test_tiny_base_is_a_hunyuan_dit_pipeline(base):
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertModel, BertTokenizer, T5EncoderModel, T5Tokenizer

    from medsynth.models.backbone import family_of, for_recipe

    tmp, data, recipe, root = base
    assert root.name.startswith("hunyuan-dit-")
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanDiTPipeline"
    for part in ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler"):
        assert (root / part).is_dir(), part
    # Detected from model_index.json alone, as a downloaded Hunyuan-DiT base would be.
    assert family_of(_recipe(tmp, data, **{"model.family": "null", "model.base": str(root)})) == "hunyuan-dit"
    assert for_recipe(recipe).name == "hunyuan-dit"
    c = _comps(recipe)
    assert isinstance(c.transformer, HunyuanDiT2DModel) and isinstance(c.text_encoder, BertModel)
    assert isinstance(c.text_encoder_2, T5EncoderModel)
    assert isinstance(c.tokenizer, BertTokenizer) and isinstance(c.tokenizer_2, T5Tokenizer)
    cfg = c.transformer.config
    assert (cfg.text_len, cfg.text_len_t5, cfg.learn_sigma) == (77, 256, True)
    assert cfg.cross_attention_dim == c.text_encoder.config.hidden_size
    assert cfg.cross_attention_dim_t5 == c.text_encoder_2.config.d_model
    for tok in (c.tokenizer, c.tokenizer_2):
        ids = tok("An endoscopic image of polyps").input_ids
        assert tok.unk_token_id not in ids, ids
    assert isinstance(c.scheduler, DDPMScheduler) and c.scheduler.config.beta_schedule == "scaled_linear"
    pipe = HunyuanDiTPipeline.from_pretrained(str(root))
    assert pipe.safety_checker is None and isinstance(pipe.tokenizer, BertTokenizer)


def test_tiny_base_refuses_a_non_x8_autoencoder(base):
    from medsynth.errors import UserError
    from medsynth.models.hunyuan_dit import ensure_tiny

    tmp, data, _, _ = base
    with pytest.raises(UserError, match=r"x2, but HunyuanDiTPipeline assumes an x8 autoencoder.*model.tiny.autoencoder=taef2"):
        ensure_tiny(_recipe(tmp, data, **{"model.tiny.autoencoder": "fitted", "model.tiny.vae_channels": "[8,16]"}))


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_generate_matches_hunyuan_dit_pipeline(base, negative):
    from diffusers import DPMSolverMultistepScheduler

    from medsynth import sampling
    from medsynth.models.hunyuan_dit import BACKBONE

    recipe = base[2]
    c = _comps(recipe)
    prompts, seeds, res, steps, guidance = ["An Endoscopic image of a Red polyp", "an image of stool"], [3, 4], 32, 4, 4.5
    ours = sampling.generate(BACKBONE, c, prompts, seeds, resolution=res, steps=steps, guidance=guidance,
                             max_length=77, negative_prompt=negative, batch_size=2, device="cpu", dtype=torch.float32)
    pipe = BACKBONE.stock_pipeline(c, DPMSolverMultistepScheduler.from_config(c.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    lat = sampling.seeded_noise(seeds, (c.transformer.config.in_channels, res // 8, res // 8), "cpu")
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt=[negative] * len(prompts), latents=lat, num_inference_steps=steps,
                      guidance_scale=guidance, height=res, width=res, use_resolution_binning=False,
                      output_type="pt").images * 2 - 1
        # The synthesis path: the same pipeline fed medsynth's precomputed conditioning.
        cond = BACKBONE.encode(c, prompts, 77, "cpu")
        neg = BACKBONE.encode(c, [negative] * len(prompts), 77, "cpu")
        via = BACKBONE.pipeline_generate(pipe, cond, neg, lat, steps=steps, guidance=guidance, resolution=res)
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - HunyuanDiTPipeline| = {diff:.3g}")
    assert diff <= 1e-4, diff
    assert np.abs(via - (theirs.permute(0, 2, 3, 1).numpy() + 1) / 2).max() <= 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_predict_uses_the_target_size_and_drops_the_variance_half(base):
    """image_meta_size carries the generated size (no binning to 1024): another size changes the output."""
    from medsynth.models.hunyuan_dit import BACKBONE as BB

    c = _comps(base[2])
    cond = BB.encode(c, ["an endoscopic image of polyps"], 77, "cpu")
    x = torch.randn(1, c.transformer.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = BB.predict(c.transformer, x, torch.tensor(500), cond, (32, 32))
        b = BB.predict(c.transformer, x, torch.tensor(500), cond, (1024, 1024))
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-6


def test_hldf_colour_loss_reaches_the_dit_lora(base):
    from medsynth.finetune import hldf, lora
    from medsynth.models.hunyuan_dit import BACKBONE as BB, DIT_TARGETS
    from medsynth.recipe import HldfConfig
    from test_finetune_helpers import lora_settings

    c = _comps(base[2])
    lora.add_lora(c.transformer, lora_settings(rank=4), DIT_TARGETS["paper"], "dit")
    c.vae.requires_grad_(False)
    with torch.no_grad():  # B starts at zero, which zeroes A's gradient: give B a trained-like value
        for n, p in c.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    cond = BB.encode(c, ["an endoscopic image of polyps", "an endoscopic image of stool"], 77, "cpu")
    neg = BB.encode(c, ["", ""], 77, "cpu")
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    m, s = hldf.colour_stats(real)
    r = hldf.hldf_step(BB, c.transformer, c.vae, c.scheduler.config, HldfConfig(steps=3, guidance=4.5), cond, neg, m,
                       s, torch.Generator().manual_seed(0), (2, c.transformer.config.in_channels, 4, 4))
    r.loss.backward()
    grads = {n: p.grad for n, p in c.transformer.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    nonzero = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert len(nonzero) > len(grads) // 2, f"only {len(nonzero)}/{len(grads)} LoRA tensors got a gradient"
    # The text encoders are frozen: nothing of theirs takes part in the graph.
    for te in (c.text_encoder, c.text_encoder_2):
        assert all(p.grad is None for p in te.parameters())


def test_dry_run_says_it_cannot_estimate_hunyuan_dit(base):
    tmp, data, _, _ = base
    r = run_cli("finetune", "demo", "--dry-run", *_sets(tmp, data, **HY), env=_env(tmp))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "--dry-run estimates only a DiT conditioned by one T5 text encoder in this version, not model.family 'hunyuan-dit'" in r.stderr and "Traceback" not in r.stderr


def _shard_images(out: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    imgs = {}
    for shard in sorted(out.glob("synth-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png"):
                    imgs[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
    return imgs


@pytest.fixture(scope="module")
def ran(base):
    """`medsynth run` prepare -> score with the tiny Hunyuan-DiT base, DiT LoRA, HLDF on, the recipe's
    default finetune.lora.text_encoder (true) left as it is."""
    tmp, data, _, _ = base
    run = {"finetune.max_steps": 4, "finetune.lora.alpha": 16}
    r = run_cli("run", "demo", *_sets(tmp, data, **HY, **run), env=_env(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, data, _recipe(tmp, data, **run), r.stderr


def test_run_completes_through_score_with_colour_loss(ran):
    tmp, _, recipe, stderr = ran
    ws = tmp / "ws"
    assert "finetune.lora.text_encoder: true is ignored for model.family 'hunyuan-dit'" in stderr
    log = _read_log(ws)
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert "loss/color_mean" in log[3] and "loss/color_mean" not in log[0]  # HLDF every 4 steps, logged apart
    final = ws / "finetune" / "final"
    info = json.loads((final / "adapter.json").read_text())
    assert info["family"] == "hunyuan-dit" and info["denoiser"] == "transformer" and info["text_encoders"] == []
    assert info["transformer_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert sorted(p.name for p in final.iterdir() if p.is_dir()) == ["transformer"]
    assert not (final / "pytorch_lora_weights.safetensors").exists()  # no diffusers LoRA loader for Hunyuan-DiT
    # The shards read as the PixArt ones do: webdataset and timm's wds reader, labels per class.
    import webdataset as wds
    from timm.data import create_dataset

    shards = sorted(str(p) for p in (ws / "synthetic").glob("synth-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    names = [c["name"] for c in json.loads((ws / "classes.json").read_text())["classes"]]
    assert sorted(s["__key__"] for s in samples) == sorted(f"{n}-{i:06d}" for n in names for i in range(2))
    for x in samples:
        assert int(x["cls"]) == names.index(x["json"]["label"]) and x["png"].size == (32, 32)
    items = list(create_dataset("wds/medsynth", root=str(ws / "synthetic"), split="train", input_img_mode="RGB"))
    assert sorted(int(t) for _, t in items) == [0, 0, 1, 1, 2, 2]
    assert (ws / "score" / "scores.json").is_file()


def test_load_finetuned_on_a_stock_pipeline_gives_the_synthesized_images(ran):
    """A user's HunyuanDiTPipeline + medsynth.load_finetuned(final/) == medsynth's synthesis path."""
    from diffusers import DPMSolverMultistepScheduler, HunyuanDiTPipeline

    import medsynth
    from medsynth.models.loading import resolve_base

    tmp, _, r, _ = ran
    ws, final = tmp / "ws", tmp / "ws" / "finetune" / "final"
    s, m = r.synthesize, r.model
    samples, prompts, ours, noise = synthesized(r, ws, final, s.per_class)
    pipe = HunyuanDiTPipeline.from_pretrained(resolve_base(r), torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    args = dict(prompt=[prompts[x.key] for x in samples], negative_prompt=[s.negative_prompt] * len(samples),
                latents=noise, num_inference_steps=s.steps, guidance_scale=s.guidance,
                height=m.resolution, width=m.resolution, use_resolution_binning=False, output_type="np")
    theirs = assert_stock_parity(pipe, args, lambda p: medsynth.load_finetuned(p, ws / "finetune"), ours,
                                 "load_finetuned pipeline", min_change=1e-3)
    # ... and the PNGs `medsynth run` wrote are those images, rounded.
    shards = _shard_images(ws / "synthetic")
    want = (theirs * 255).round().clip(0, 255).astype(np.uint8)
    for x, img in zip(samples, want):
        assert np.abs(shards[x.key].astype(int) - img.astype(int)).max() <= 1, x.key


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(base):
    """6 steps in one go == kill -9 after the step-3 checkpoint + --resume to 6, with the text cache
    (two embeddings + two masks) rebuilt on resume."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    from _helpers import kill_medsynth_when

    tmp0, data, _, _ = base
    tmp = tmp0 / "resume"
    tmp.mkdir()
    shutil.copytree(tmp0 / "ws", tmp / "ws", ignore=shutil.ignore_patterns("finetune", "synth*", "classify*", "score*"))
    ws, sets = tmp / "ws", _sets(tmp, data, **HY)
    cmd = [sys.executable, "-m", "medsynth", "finetune", "demo"]
    env = {**os.environ, **_env(tmp)}
    r = subprocess.run([*cmd, "--max-steps", "6", *sets], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    f = "transformer/adapter_model.safetensors"
    want = load_file(str(ws / "finetune" / "final" / f))
    want_log = _read_log(ws)
    shutil.move(ws / "finetune", tmp / "finetune-uninterrupted")

    ck3 = ws / "finetune" / "checkpoints" / "step-0000003" / "state.json"
    kill_medsynth_when(["finetune", "demo", "--max-steps", "1000", *sets], ck3.is_file, env=env, poll=0.01)
    assert sorted(p.name for p in (ws / "finetune" / "checkpoints").glob("step-*")) == ["step-0000003"]

    r = subprocess.run([*cmd, "--resume", "--max-steps", "6", *sets], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 3)" in r.stderr
    got = load_file(str(ws / "finetune" / "final" / f))
    assert want.keys() == got.keys() and got
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    got_log = _read_log(ws)
    assert [x["step"] for x in got_log] == list(range(1, 7))
    for a, b in zip(want_log, got_log):
        assert a["loss/diffusion"] == pytest.approx(b["loss/diffusion"], abs=1e-6)
        assert a.get("loss/color_mean", 0) == pytest.approx(b.get("loss/color_mean", 0), abs=1e-6)
