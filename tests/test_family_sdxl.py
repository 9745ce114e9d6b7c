"""The `sdxl` family (Stable Diffusion XL) on its tiny base: layout, conditioning as encode_prompt,
sampler parity with StableDiffusionXLPipeline, HLDF gradients into the UNet and both CLIP LoRAs,
`medsynth run` through score, the diffusers LoRA file loading with `pipe.load_lora_weights`, and
exact resume after kill -9 (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import kill_medsynth_when
from _family import assert_stock_parity, cli_env, family_recipe, load_comps, prepare_family_base, synthesized
from conftest import run_cli
from test_family_sd import _shard_images
from test_finetune_cli import _read_log, _sets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SDXL = {"model.family": "sdxl", "finetune.adapter": "lora", "model.max_text_tokens": 77, "model.tiny.heads": 2,
        "model.tiny.head_dim": 8, "model.tiny.text_dim": 32, "synthesize.per_class": 2, "synthesize.steps": 3,
        "classify.epochs": 1, "classify.image_size": 32, "classify.batch_size": 8}
TES = ("text_encoder", "text_encoder_2")


_env = cli_env
_comps = load_comps


def _recipe(tmp: Path, data: Path, **extra):
    return family_recipe(tmp, data, SDXL, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A prepared 3-class HyperKvasir subset and its tiny SDXL base (built once for the module)."""
    return prepare_family_base(tmp_path_factory, "sdxl", SDXL)


def test_tiny_base_is_a_stable_diffusion_xl_pipeline(base):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from medsynth.models.backbone import family_of, for_recipe

    tmp, data, recipe, root = base
    assert root.parent.name == "tiny-base" and root.name.startswith("sdxl-")
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    for part in ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"):
        assert (root / part).is_dir(), part
    # Detected from model_index.json alone, as a downloaded SDXL base would be.
    assert family_of(_recipe(tmp, data, **{"model.family": "null", "model.base": str(root)})) == "sdxl"
    assert for_recipe(recipe).name == "sdxl"
    c = _comps(recipe)
    assert isinstance(c.unet, UNet2DConditionModel) and c.unet.config.addition_embed_type == "text_time"
    assert isinstance(c.text_encoder, CLIPTextModel) and isinstance(c.text_encoder_2, CLIPTextModelWithProjection)
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert c.unet.config.projection_class_embeddings_input_dim == (
        6 * c.unet.config.addition_time_embed_dim + c.text_encoder_2.config.projection_dim)
    for tok in (c.tokenizer, c.tokenizer_2):
        assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 77
        ids = tok("An endoscopic image of polyps").input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids[1:-1]
    assert c.tokenizer_2.pad_token == "!" and c.tokenizer.pad_token == "<|endoftext|>"
    assert c.scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    assert c.scheduler.config.timestep_spacing == "leading" and c.scheduler.config.steps_offset == 1
    assert DDPMScheduler.from_config(c.scheduler.config).config.clip_sample is False
    assert c.vae.config.force_upcast is True  # an fp16 StableDiffusionXLPipeline decodes in fp32
    StableDiffusionXLPipeline.from_pretrained(str(root))


def test_encode_matches_encode_prompt(base):
    from medsynth.models.sdxl import BACKBONE

    c = _comps(base[2])
    pipe = BACKBONE.stock_pipeline(c)
    prompts = ["an endoscopic image of polyps", "an image of stool"]
    with torch.no_grad():
        ours = BACKBONE.encode(c, prompts, 77, "cpu")
        pe, npe, pp, npp = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True,
                                              negative_prompt=["blurry", "dark"])
        neg = BACKBONE.encode(c, ["blurry", "dark"], 77, "cpu")
        empty = BACKBONE.encode(c, ["", "dark"], 77, "cpu")
        _, zeros, _, zeros_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(ours["embeds"], pe, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled"], pp, rtol=0, atol=0)
    torch.testing.assert_close(neg["embeds"], npe, rtol=0, atol=0)
    torch.testing.assert_close(neg["pooled"], npp, rtol=0, atol=0)
    # force_zeros_for_empty_prompt: an empty prompt is the pipeline's zero negative, row by row.
    assert zeros.abs().max() == 0 and zeros_pooled.abs().max() == 0
    assert empty["embeds"][0].abs().max() == 0 and empty["pooled"][0].abs().max() == 0
    torch.testing.assert_close(empty["embeds"][1], npe[1], rtol=0, atol=0)


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_generate_matches_stable_diffusion_xl_pipeline(base, negative):
    from diffusers import DPMSolverMultistepScheduler

    from medsynth import sampling
    from medsynth.models.sdxl import BACKBONE

    recipe = base[2]
    c = _comps(recipe)
    prompts, seeds, res, steps, guidance = ["An Endoscopic image of a Red polyp", "an image of stool"], [3, 4], 32, 4, 4.5
    ours = sampling.generate(BACKBONE, c, prompts, seeds, resolution=res, steps=steps, guidance=guidance,
                             max_length=77, negative_prompt=negative, batch_size=2, device="cpu", dtype=torch.float32)
    pipe = BACKBONE.stock_pipeline(c, DPMSolverMultistepScheduler.from_config(c.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    f = BACKBONE.vae_scale(c.vae)
    lat = sampling.seeded_noise(seeds, (c.unet.config.in_channels, res // f, res // f), "cpu")
    # No negative prompt = the pipeline's default call (zeros, force_zeros_for_empty_prompt).
    neg = [negative] * len(prompts) if negative else None
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt=neg, latents=lat, num_inference_steps=steps, guidance_scale=guidance,
                      height=res, width=res, output_type="pt").images * 2 - 1
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - StableDiffusionXLPipeline| = {diff:.3g}")
    assert diff <= 1e-4, diff
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_time_ids_follow_the_resolution(base):
    """target / original size = the pixel size the loop and sampler pass (the training resolution)."""
    from medsynth.models.sdxl import BACKBONE

    c = _comps(base[2])
    cond = BACKBONE.encode(c, ["an endoscopic image of polyps"], 77, "cpu")
    x = torch.randn(1, c.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = BACKBONE.predict(c.unet, x, torch.tensor(500), cond, (32, 32))
        b = BACKBONE.predict(c.unet, x, torch.tensor(500), cond, (64, 64))
        ids = BACKBONE.time_ids((32, 32), 1, "cpu", torch.float32)
        ref = c.unet(x, 500, encoder_hidden_states=cond["embeds"],
                     added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": ids}).sample
    assert ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    assert (a - b).abs().max() > 0


def test_fp16_synthesis_decodes_in_fp32(base):
    """SDXL's VAE overflows in fp16: the synthesis path (the stock pipeline through pipeline_generate)
    decodes in fp32 because the VAE config says force_upcast, and leaves the VAE in fp16 afterwards."""
    from medsynth.models.loading import load_components
    from medsynth.models.sdxl import BACKBONE

    c = load_components(base[2], device="cpu", dtype=torch.float16)
    pipe = BACKBONE.stock_pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = c.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.no_grad():
        cond = BACKBONE.encode(c, ["an endoscopic image of polyps"], 77, "cpu")
        neg = BACKBONE.encode(c, [""], 77, "cpu")
        f = BACKBONE.vae_scale(c.vae)
        lat = torch.randn(1, c.unet.config.in_channels, 32 // f, 32 // f, dtype=torch.float16)
        img = BACKBONE.pipeline_generate(pipe, cond, neg, lat, steps=2, guidance=4.5, resolution=32)
    hook.remove()
    assert seen == [torch.float32] and c.vae.dtype == torch.float16
    assert np.isfinite(img).all()


def test_hldf_colour_loss_reaches_unet_and_both_clip_loras(base):
    from medsynth.finetune import hldf, lora
    from medsynth.models.sdxl import BACKBONE as BB
    from medsynth.models.sd import CLIP_TARGETS, UNET_TARGETS
    from medsynth.recipe import HldfConfig
    from test_finetune_helpers import lora_settings

    c = _comps(base[2])
    lc = lora_settings(rank=4)
    lora.add_lora(c.unet, lc, UNET_TARGETS["paper"], "unet")
    for te in TES:
        lora.add_lora(getattr(c, te), lc, CLIP_TARGETS["paper_parity"], te)
    c.vae.requires_grad_(False)
    models = {"UNet": c.unet, **{te: getattr(c, te) for te in TES}}
    with torch.no_grad():  # B starts at zero, which zeroes A's gradient: give B a trained-like value
        for m in models.values():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    cond = BB.encode(c, ["an endoscopic image of polyps", "an endoscopic image of stool"], 77, "cpu")
    neg = BB.encode(c, ["blurry", "blurry"], 77, "cpu")
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    m, s = hldf.colour_stats(real)
    f = BB.vae_scale(c.vae)
    r = hldf.hldf_step(BB, c.unet, c.vae, c.scheduler.config, HldfConfig(steps=3, guidance=4.5), cond, neg, m, s,
                       torch.Generator().manual_seed(0), (2, c.unet.config.in_channels, 32 // f, 32 // f),
                       pixel_size=(32, 32))
    r.loss.backward()
    # text_encoder's last layer feeds nothing (SDXL takes its penultimate hidden states): its LoRA gets none.
    last = f"layers.{c.text_encoder.config.num_hidden_layers - 1}."
    assert all(p.grad is None or p.grad.abs().sum() == 0
               for n, p in c.text_encoder.named_parameters() if "lora_" in n and last in n)
    for what, model in models.items():
        grads = {n: p.grad for n, p in model.named_parameters()
                 if p.requires_grad and not (what == "text_encoder" and last in n)}
        assert grads and all("lora_" in n for n in grads), what
        nonzero = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
        assert len(nonzero) > len(grads) // 2, f"{what}: only {len(nonzero)}/{len(grads)} LoRA tensors got a gradient"


def test_dry_run_says_it_cannot_estimate_a_unet(base):
    tmp, data, _, _ = base
    r = run_cli("finetune", "demo", "--dry-run", *_sets(tmp, data, **SDXL), env=_env(tmp))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "--dry-run estimates only a DiT conditioned by one T5 text encoder in this version, not model.family 'sdxl'" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def ran(base):
    """`medsynth run` prepare -> score with the tiny SDXL base, LoRA on the UNet and both CLIPs, HLDF on."""
    tmp, data, _, _ = base
    # alpha != rank: the diffusers LoRA file must carry the scale (alpha / r = 2), not leave it to the loader's default.
    run = {"finetune.max_steps": 4, "finetune.lora.alpha": 16, "finetune.checkpoint_every": 2}
    r = run_cli("run", "demo", *_sets(tmp, data, **SDXL, **run), env=_env(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, data, _recipe(tmp, data, **run)


def test_run_completes_through_score_with_colour_loss(ran):
    from safetensors.torch import load_file

    tmp, _, recipe = ran
    ws = tmp / "ws"
    log = _read_log(ws)
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert "loss/color_mean" in log[3] and "loss/color_mean" not in log[0]  # HLDF every 4 steps, logged apart
    final = ws / "finetune" / "final"
    info = json.loads((final / "adapter.json").read_text())
    assert info["family"] == "sdxl" and info["denoiser"] == "unet" and info["text_encoders"] == list(TES)
    for part in ("unet", *TES):
        assert (final / part / "adapter_model.safetensors").is_file(), part
    # The checkpoint holds every trained part under its own prefix.
    ck = sorted((ws / "finetune" / "checkpoints").glob("step-*"))[-1]
    keys = load_file(str(ck / "trainable.safetensors")).keys()
    for part in ("unet", *TES):
        assert any(k.startswith(part + ".") and "lora_" in k for k in keys), part
    lora = load_file(str(final / "pytorch_lora_weights.safetensors"))
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in lora), prefix
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


def test_load_lora_weights_gives_the_synthesized_images(ran):
    """A user's StableDiffusionXLPipeline + pipe.load_lora_weights(final/) == medsynth's synthesis path."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from medsynth.models.loading import resolve_base

    tmp, _, r = ran
    ws, final = tmp / "ws", tmp / "ws" / "finetune" / "final"
    s, m = r.synthesize, r.model
    samples, prompts, ours, noise = synthesized(r, ws, final, s.per_class)
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_base(r), torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    neg = [s.negative_prompt] * len(samples) if s.negative_prompt else None
    args = dict(prompt=[prompts[x.key] for x in samples], negative_prompt=neg, latents=noise,
                num_inference_steps=s.steps, guidance_scale=s.guidance, height=m.resolution, width=m.resolution,
                output_type="np")
    theirs = assert_stock_parity(pipe, args, lambda p: p.load_lora_weights(str(final)), ours,
                                 "load_lora_weights pipeline", min_change=1e-3)
    shards = _shard_images(ws / "synthetic")
    want = (theirs * 255).round().clip(0, 255).astype(np.uint8)
    for x, img in zip(samples, want):
        assert np.abs(shards[x.key].astype(int) - img.astype(int)).max() <= 1, x.key


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(base):
    """6 steps in one go == kill -9 after the step-3 checkpoint + --resume to 6."""
    from safetensors.torch import load_file

    tmp0, data, _, _ = base
    tmp = tmp0 / "resume"
    tmp.mkdir()
    shutil.copytree(tmp0 / "ws", tmp / "ws", ignore=shutil.ignore_patterns("finetune", "synth*", "classify*", "score*"))
    ws, sets = tmp / "ws", _sets(tmp, data, **SDXL)
    cmd = [sys.executable, "-m", "medsynth", "finetune", "demo"]
    env = {**os.environ, **_env(tmp)}
    r = subprocess.run([*cmd, "--max-steps", "6", *sets], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = ("unet/adapter_model.safetensors", "text_encoder/adapter_model.safetensors",
             "text_encoder_2/adapter_model.safetensors", "pytorch_lora_weights.safetensors")
    want = {k: load_file(str(ws / "finetune" / "final" / k)) for k in files}
    want_log = _read_log(ws)
    shutil.move(ws / "finetune", tmp / "finetune-uninterrupted")

    ck3 = ws / "finetune" / "checkpoints" / "step-0000003" / "state.json"
    kill_medsynth_when(["finetune", "demo", "--max-steps", "1000", *sets], ck3.is_file, env=env)
    assert sorted(p.name for p in (ws / "finetune" / "checkpoints").glob("step-*")) == ["step-0000003"]

    r = subprocess.run([*cmd, "--resume", "--max-steps", "6", *sets], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 3)" in r.stderr
    for f in files:
        got = load_file(str(ws / "finetune" / "final" / f))
        assert want[f].keys() == got.keys() and got
        for k in got:
            torch.testing.assert_close(got[k], want[f][k], rtol=0, atol=1e-6)
    got_log = _read_log(ws)
    assert [x["step"] for x in got_log] == list(range(1, 7))
    for a, b in zip(want_log, got_log):
        assert a["loss/diffusion"] == pytest.approx(b["loss/diffusion"], abs=1e-6)
        assert a.get("loss/color_mean", 0) == pytest.approx(b.get("loss/color_mean", 0), abs=1e-6)
