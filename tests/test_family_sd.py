"""The `sd` family (Stable Diffusion 1.x) on its tiny base: layout, sampler parity with
StableDiffusionPipeline, HLDF gradients into UNet and CLIP LoRA, `medsynth run` through score,
exact resume after kill -9, and the diffusers LoRA file loading with `pipe.load_lora_weights`."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import kill_medsynth_when
from _family import assert_quiet, assert_stock_parity, cli_env, family_recipe, load_comps, prepare_family_base, synthesized
from conftest import run_cli
from test_finetune_cli import _read_log, _sets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SD = {"model.family": "sd", "finetune.adapter": "lora", "model.max_text_tokens": 77, "model.tiny.heads": 2,
      "model.tiny.head_dim": 8, "model.tiny.text_dim": 32, "synthesize.per_class": 2, "synthesize.steps": 3,
      "classify.epochs": 1, "classify.image_size": 32, "classify.batch_size": 8}


_env = cli_env
_comps = load_comps


def _recipe(tmp: Path, data: Path, **extra):
    return family_recipe(tmp, data, SD, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A prepared 3-class HyperKvasir subset and its tiny SD base (built once for the module)."""
    return prepare_family_base(tmp_path_factory, "sd", SD)


def test_tiny_base_is_a_stable_diffusion_pipeline(base):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from medsynth.models.backbone import family_of, for_recipe

    tmp, data, recipe, root = base
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for part in ("unet", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (root / part).is_dir(), part
    # Detected from model_index.json alone, as a downloaded SD base would be.
    assert family_of(_recipe(tmp, data, **{"model.family": "null", "model.base": str(root)})) == "sd"
    assert for_recipe(recipe).name == "sd"
    c = _comps(recipe)
    assert isinstance(c.unet, UNet2DConditionModel) and isinstance(c.text_encoder, CLIPTextModel)
    assert isinstance(c.tokenizer, CLIPTokenizer) and c.tokenizer.model_max_length == 77
    ids = c.tokenizer("An endoscopic image of polyps").input_ids
    assert ids[0] == c.tokenizer.bos_token_id and ids[-1] == c.tokenizer.eos_token_id
    assert c.tokenizer.unk_token_id not in ids[1:-1]
    assert c.scheduler.__class__.__name__ == "PNDMScheduler" and c.scheduler.config.steps_offset == 1
    assert DPMSolverMultistepScheduler.from_config(c.scheduler.config).config.beta_schedule == "scaled_linear"
    assert DDPMScheduler.from_config(c.scheduler.config).config.clip_sample is False
    pipe = StableDiffusionPipeline.from_pretrained(str(root))
    assert pipe.safety_checker is None


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_generate_matches_stable_diffusion_pipeline(base, negative):
    from diffusers import DPMSolverMultistepScheduler

    from medsynth import sampling
    from medsynth.models.sd import BACKBONE

    recipe = base[2]
    c = _comps(recipe)
    prompts, seeds, res, steps, guidance = ["An Endoscopic image of a Red polyp", "an image of stool"], [3, 4], 32, 4, 4.5
    ours = sampling.generate(BACKBONE, c, prompts, seeds, resolution=res, steps=steps, guidance=guidance,
                             max_length=77, negative_prompt=negative, batch_size=2, device="cpu", dtype=torch.float32)
    pipe = BACKBONE.stock_pipeline(c, DPMSolverMultistepScheduler.from_config(c.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    lat = sampling.seeded_noise(seeds, (c.unet.config.in_channels, res // 2, res // 2), "cpu")
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt=[negative] * len(prompts), latents=lat, num_inference_steps=steps,
                      guidance_scale=guidance, height=res, width=res, output_type="pt").images * 2 - 1
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - StableDiffusionPipeline| = {diff:.3g}")
    assert diff <= 1e-4, diff
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_hldf_colour_loss_reaches_unet_and_clip_lora(base):
    from medsynth.finetune import hldf, lora
    from medsynth.models.sd import BACKBONE as BB, CLIP_TARGETS, UNET_TARGETS
    from medsynth.recipe import HldfConfig
    from test_finetune_helpers import lora_settings

    c = _comps(base[2])
    lc = lora_settings(rank=4)
    lora.add_lora(c.unet, lc, UNET_TARGETS["paper"], "unet")
    lora.add_lora(c.text_encoder, lc, CLIP_TARGETS["paper_parity"], "clip")
    c.vae.requires_grad_(False)
    with torch.no_grad():  # B starts at zero, which zeroes A's gradient: give B a trained-like value
        for n, p in list(c.unet.named_parameters()) + list(c.text_encoder.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    cond = BB.encode(c, ["an endoscopic image of polyps", "an endoscopic image of stool"], 77, "cpu")
    neg = BB.encode(c, ["", ""], 77, "cpu")
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    m, s = hldf.colour_stats(real)
    r = hldf.hldf_step(BB, c.unet, c.vae, c.scheduler.config, HldfConfig(steps=3, guidance=4.5), cond, neg, m, s,
                       torch.Generator().manual_seed(0), (2, c.unet.config.in_channels, 16, 16))
    r.loss.backward()
    for model, what in ((c.unet, "UNet"), (c.text_encoder, "CLIP")):
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in n for n in grads), what
        nonzero = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
        assert len(nonzero) > len(grads) // 2, f"{what}: only {len(nonzero)}/{len(grads)} LoRA tensors got a gradient"


def test_dry_run_says_it_cannot_estimate_a_unet(base):
    tmp, data, _, _ = base
    r = run_cli("finetune", "demo", "--dry-run", *_sets(tmp, data, **SD), env=_env(tmp))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "--dry-run estimates only a DiT conditioned by one T5 text encoder in this version, not model.family 'sd'" in r.stderr and "Traceback" not in r.stderr


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
    """`medsynth run` prepare -> score with the tiny SD base, LoRA on UNet and CLIP, HLDF on."""
    tmp, data, _, _ = base
    # alpha != rank: the diffusers LoRA file must carry the scale (alpha / r = 2), not leave it to the loader's default.
    run = {"finetune.max_steps": 4, "finetune.lora.alpha": 16}
    r = run_cli("-q", "run", "demo", *_sets(tmp, data, **SD, **run), env=_env(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    _STDERR["run"] = r.stderr
    return tmp, data, _recipe(tmp, data, **run)


_STDERR: dict[str, str] = {}


def test_quiet_run_prints_no_library_chatter(ran):
    """-q: no weight-loading progress bars, library log lines or library Future/Deprecation warnings
    (a run loads a UNet, a CLIP text encoder, a VAE and a classifier)."""
    assert_quiet(_STDERR["run"])


def test_run_completes_through_score_with_colour_loss(ran):
    tmp, _, recipe = ran
    ws = tmp / "ws"
    log = _read_log(ws)
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert "loss/color_mean" in log[3] and "loss/color_mean" not in log[0]  # HLDF every 4 steps, logged apart
    info = json.loads((ws / "finetune" / "final" / "adapter.json").read_text())
    assert info["family"] == "sd" and info["denoiser"] == "unet" and info["text_encoders"] == ["text_encoder"]
    assert info["transformer_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (ws / "finetune" / "final" / "pytorch_lora_weights.safetensors").is_file()
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


def test_load_lora_weights_gives_the_synthesized_images(ran):
    """A user's StableDiffusionPipeline + pipe.load_lora_weights(final/) == medsynth's synthesis path."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from medsynth.models.loading import resolve_base

    tmp, _, r = ran
    ws, final = tmp / "ws", tmp / "ws" / "finetune" / "final"
    s, m = r.synthesize, r.model
    samples, prompts, ours, noise = synthesized(r, ws, final, s.per_class)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base(r), torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    args = dict(prompt=[prompts[x.key] for x in samples], negative_prompt=[s.negative_prompt] * len(samples),
                latents=noise, num_inference_steps=s.steps, guidance_scale=s.guidance, height=m.resolution,
                width=m.resolution, output_type="np")
    theirs = assert_stock_parity(pipe, args, lambda p: p.load_lora_weights(str(final)), ours,
                                 "load_lora_weights pipeline", min_change=1e-3)
    # ... and the PNGs `medsynth run` wrote are those images, rounded.
    shards = _shard_images(ws / "synthetic")
    want = (theirs * 255).round().clip(0, 255).astype(np.uint8)
    for x, img in zip(samples, want):
        assert np.abs(shards[x.key].astype(int) - img.astype(int)).max() <= 1, x.key


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(base):
    """6 steps in one go == kill -9 after the step-3 checkpoint + --resume to 6 (as test_finetune_cli's PixArt test)."""
    from safetensors.torch import load_file

    tmp0, data, _, _ = base
    tmp = tmp0 / "resume"
    tmp.mkdir()
    shutil.copytree(tmp0 / "ws", tmp / "ws", ignore=shutil.ignore_patterns("finetune", "synth*", "classify*", "score*"))
    ws, sets = tmp / "ws", _sets(tmp, data, **SD)
    cmd = [sys.executable, "-m", "medsynth", "finetune", "demo"]
    env = {**os.environ, **_env(tmp)}
    r = subprocess.run([*cmd, "--max-steps", "6", *sets], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = ("unet/adapter_model.safetensors", "text_encoder/adapter_model.safetensors", "pytorch_lora_weights.safetensors")
    want = {k: load_file(str(ws / "finetune" / "final" / k)) for k in files}
    want_log = _read_log(ws)
    shutil.move(ws / "finetune", tmp / "finetune-uninterrupted")

    ck3 = ws / "finetune" / "checkpoints" / "step-0000003" / "state.json"
    kill_medsynth_when([*cmd[3:], "--max-steps", "1000", *sets], ck3.is_file, env=env, timeout=300, poll=0.01)
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


def test_tiny_clip_tokenizer_is_the_same_in_every_process(tmp_path):
    """The tiny CLIP tokenizer (and so the tiny SD / SDXL base and everything trained on it) must not
    depend on the process: tokenizers' BpeTrainer broke ties differently per process (2 vocabularies
    in 3 runs), which moved the bench's synthetic-only balanced accuracy from 0.63 to 0.41 at one seed."""
    # Sana's tiny Gemma tokenizer learns its merges the same way: checked in the same processes.
    code = ("import hashlib, json, sys\n"
            "from medsynth.recipe import load_recipe\n"
            "from medsynth.models.sana import build_gemma_tokenizer\n"
            "from medsynth.models.sd import build_clip_tokenizer\n"
            "r = load_recipe('demo', [f'workdir={sys.argv[1]}', 'model.family=sd', 'modality=endoscopic'])\n"
            "v = [sorted(build(r).get_vocab().items()) for build in (build_clip_tokenizer, build_gemma_tokenizer)]\n"
            "print(hashlib.sha256(json.dumps(v).encode()).hexdigest())\n")
    digests = set()
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ws")], capture_output=True, text=True,
                           env={**os.environ, **cli_env(tmp_path)}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        digests.add(r.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


def test_learned_merges_break_ties_by_the_pair_text():
    from collections import Counter

    from medsynth.models.tiny import learn_bpe_merges

    # 'ab' and 'cd' are equally frequent: the merge of the alphabetically first pair comes first.
    assert learn_bpe_merges(Counter({"cdx": 2, "abx": 2}), 1, "</w>") == [("a", "b")]
    # Frequency first: 'cd' (3) before 'ab' (2), then the pair it made ('cd', 'x</w>', 3) before 'ab'.
    assert learn_bpe_merges(Counter({"cdx": 3, "abx": 2}), 3, "</w>") == [("c", "d"), ("cd", "x</w>"), ("a", "b")]
    assert learn_bpe_merges(Counter({"aa": 1}), 5, "</w>") == [("a", "a</w>")]  # stops when nothing is left to merge
