"""medsynth on real-shaped Stable Diffusion 1.5 and SDXL bases (tests/real_shaped_unet.py): the hub layouts and
configs at full width with the depth cut and random weights, driven through the normal recipe / CLI machinery.

These take paths the tiny SD / SDXL bases never take: the hub's model_index.json with the safety checker and
feature extractor listed (and the safety checker's folder absent), SD 1.5's diffusers-0.6 UNet config
(``attention_head_dim`` 8 = heads), a VAE config without ``scaling_factor`` and a scheduler config without
``prediction_type``, transformers-4.x CLIP configs with the legacy eos id 2 (pooling at argmax(input_ids)), slow
tokenizer files without tokenizer.json, fp16 weights loaded as fp32, SDXL's per-level heads, 2048-wide
cross-attention, 2816 add-embedding and VAE scaling 0.13025 with force_upcast. They say nothing about image
quality. Default run: layout, family detection, loading, conditioning and SDXL sampling parity, SDXL fp16 decode;
``-m slow`` adds the CLI runs (fp32 and bf16) with the load_lora_weights parity, and SD 1.5 sampling parity.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import real_shaped_unet as R
from _family import assert_stock_parity, synthesized
from conftest import ONE_THREAD, run_cli
from test_real_shaped import RES, _check_synthetic, _finetune_two_steps, _sets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# SD / SDXL condition on all 77 CLIP positions whatever the recipe's T5 limit says.
CLIP = {"model.max_text_tokens": 77}

@pytest.fixture(scope="module", params=R.KINDS)
def kind(request) -> str:
    """Module-scoped, so pytest runs every sd15 test, then every sdxl one (one base in memory at a time)."""
    return request.param


@pytest.fixture(scope="module")
def root(kind) -> Path:
    t0 = time.time()
    r = R.ensure(kind)
    print(f"real-shaped {kind} ready in {time.time() - t0:.1f} s: {R.info(r)}")
    return r


def _recipe(base: Path, tmp: Path, *extra: str):
    from medsynth.recipe import load_recipe

    return load_recipe("demo", [f"model.base={base}", f"workdir={tmp}", "model.dtype=fp32", "model.device=cpu",
                                "model.max_text_tokens=77", *extra])


# ----------------------------------------------------------------------------- layout


def test_layout_is_the_hub_layout(kind, root):
    assert json.loads((root / "model_index.json").read_text()) == R.MODEL_INDEX[kind]
    parts = sorted(k for k, v in R.MODEL_INDEX[kind].items() if isinstance(v, list))
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    # The hub's SD 1.5 also has safety_checker/ (1.2 GB): left out on purpose, medsynth never loads it.
    assert present == [p for p in parts if p != "safety_checker"]
    unet = json.loads((root / "unet" / "config.json").read_text())
    assert unet == R.UNET_CONFIG[kind] and unet["layers_per_block"] == 1
    if kind == "sd15":
        assert (unet["block_out_channels"], unet["attention_head_dim"], unet["cross_attention_dim"]) == \
            ([320, 640, 1280, 1280], 8, 768)
        assert "use_linear_projection" not in unet and "addition_embed_type" not in unet  # diffusers 0.6's file
    else:
        assert (unet["block_out_channels"], unet["attention_head_dim"], unet["cross_attention_dim"],
                unet["addition_embed_type"], unet["addition_time_embed_dim"],
                unet["projection_class_embeddings_input_dim"], unet["transformer_layers_per_block"]) == \
            ([320, 640, 1280], [5, 10, 20], 2048, "text_time", 256, 2816, 1)
    encoders = {"text_encoder": (768, 12, 3072, "quick_gelu", 768)}
    if kind == "sdxl":
        encoders["text_encoder_2"] = (1280, 20, 5120, "gelu", 1280)
    for part, want in encoders.items():
        c = json.loads((root / part / "config.json").read_text())
        assert c == R.TEXT_ENCODER_CONFIG[kind][part] and "dtype" not in c  # transformers 4.x wrote torch_dtype
        assert (c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["hidden_act"],
                c["projection_dim"]) == want
        assert (c["vocab_size"], c["max_position_embeddings"], c["eos_token_id"], c["num_hidden_layers"]) == \
            (49408, 77, 2, 2)
    for part in [p for p in ("tokenizer", "tokenizer_2") if p in R.MODEL_INDEX[kind]]:
        assert sorted(p.name for p in (root / part).iterdir()) == \
            ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
        cfg = json.loads((root / part / "tokenizer_config.json").read_text())
        assert cfg["model_max_length"] == 77 and cfg["tokenizer_class"] == "CLIPTokenizer"
        assert cfg["pad_token"] == ("!" if part == "tokenizer_2" else "<|endoftext|>")
    vae = json.loads((root / "vae" / "config.json").read_text())
    assert vae["block_out_channels"] == [128, 256, 512, 512]
    assert vae == R.VAE_CONFIG[kind]
    assert (vae.get("scaling_factor"), vae.get("force_upcast")) == {"sd15": (None, None), "sdxl": (0.13025, True)}[kind]
    sch = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert sch == R.SCHEDULER_CONFIG[kind]
    assert (sch["beta_schedule"], sch["beta_start"], sch["beta_end"], sch["steps_offset"]) == \
        ("scaled_linear", 0.00085, 0.012, 1)
    if kind == "sd15":
        assert sch["_class_name"] == "PNDMScheduler" and sch["skip_prk_steps"] and not sch["set_alpha_to_one"]
        assert "prediction_type" not in sch
    else:
        assert (sch["_class_name"], sch["timestep_spacing"], sch["interpolation_type"]) == \
            ("EulerDiscreteScheduler", "leading", "linear")


def test_family_is_read_from_model_index(kind, root, tmp_path):
    from medsynth.models.backbone import family_of

    recipe = _recipe(root, tmp_path)
    assert recipe.model.family in (None, "")  # nothing in the recipe says which family
    assert family_of(recipe) == {"sd15": "sd", "sdxl": "sdxl"}[kind]


def test_check_base_accepts_the_hub_tokenizer_folder(kind, root, tmp_path):
    """The hub's SD 1.5 / SDXL tokenizer/ holds vocab.json + merges.txt and no tokenizer.json; check_base once
    refused every real SD / SDXL base for it, before any work."""
    from medsynth.models import loading

    assert not (root / "tokenizer" / "tokenizer.json").exists() and (root / "tokenizer" / "vocab.json").is_file()
    loading.check_base(_recipe(root, tmp_path))


# ----------------------------------------------------------------------------- end to end (CLI)
# Before the module fixture below loads a base into this process, so one UNet is in memory at a time.


@pytest.mark.slow
def test_finetune_synthesize_and_load_lora_weights(kind, root, tmp_path):
    """2 LoRA steps (UNet + every CLIP, HLDF at both, gradient checkpointing) -> sample grid -> synthesize;
    then a stock pipeline from the base directory with ``pipe.load_lora_weights(final/)`` makes medsynth's images."""
    from medsynth.models.loading import resolve_base

    _finetune_two_steps(tmp_path, root, **CLIP)
    final = tmp_path / "ws" / "finetune" / "final"
    info = json.loads((final / "adapter.json").read_text())
    assert info["text_encoders"] == (["text_encoder"] if kind == "sd15" else ["text_encoder", "text_encoder_2"])
    assert (final / "pytorch_lora_weights.safetensors").is_file()

    r = run_cli("--json", "synthesize", "demo", "--per-class", "1", *_sets(tmp_path, root, **CLIP), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-4000:]
    _check_synthetic(tmp_path / "ws" / "synthetic", per_class=1)

    from medsynth.recipe import load_recipe

    rec = load_recipe("demo", [x for x in _sets(tmp_path, root, **CLIP) if x != "--set"])
    ws, s, m = tmp_path / "ws", rec.synthesize, rec.model
    samples, prompts, ours, latents = synthesized(rec, ws, final, 1)

    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    # As a user loads the hub's SD 1.5 without its safety checker; SDXL's index lists nothing extra.
    extra = {"safety_checker": None} if kind == "sd15" else {}
    pipe = DiffusionPipeline.from_pretrained(resolve_base(rec), torch_dtype=torch.float32, **extra)
    assert type(pipe).__name__ == R.MODEL_INDEX[kind]["_class_name"]
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    args = dict(prompt=[prompts[x.key] for x in samples], latents=latents, num_inference_steps=s.steps,
                guidance_scale=s.guidance, height=m.resolution, width=m.resolution, output_type="np")
    if s.negative_prompt or kind == "sd15":
        args["negative_prompt"] = [s.negative_prompt] * len(samples)
    assert_stock_parity(pipe, args, lambda p: p.load_lora_weights(str(final)), ours,
                        f"{kind}: load_lora_weights pipeline", min_change=1e-4)


@pytest.mark.slow
def test_bf16_finetune_two_steps(kind, root, tmp_path):
    """The bf16 autocast path (CLIP states, pooled embeddings and SDXL's time ids under autocast) with HLDF."""
    _finetune_two_steps(tmp_path, root, **CLIP, **{"finetune.mixed_precision": "bf16"})


# ----------------------------------------------------------------------------- loading and parity


@pytest.fixture(scope="module")
def loaded(kind, root, tmp_path_factory):
    """Every part of the base through medsynth's loader, fp32 (one kind at a time: the fixture is per kind)."""
    from medsynth.models import loading

    tmp = tmp_path_factory.mktemp(f"rsu-{kind}")
    recipe = _recipe(root, tmp)
    comps = loading.load_components(recipe)
    yield recipe, comps
    del comps
    gc.collect()


def test_loader_loads_every_part(kind, loaded):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from medsynth.models.backbone import get

    recipe, c = loaded
    bb = get(c.family)
    assert bb.name == {"sd15": "sd", "sdxl": "sdxl"}[kind]
    for part in bb.parts:
        assert getattr(c, part) is not None, part
    assert isinstance(c.unet, UNet2DConditionModel) and isinstance(c.vae, AutoencoderKL)
    assert isinstance(c.text_encoder, CLIPTextModel)
    for m in (c.unet, c.vae, c.text_encoder):  # fp16 files, loaded in model.dtype
        assert next(m.parameters()).dtype == torch.float32
    assert c.tokenizer.model_max_length == 77 and c.tokenizer.pad_token == "<|endoftext|>"
    ids = c.tokenizer("An endoscopic image of a red polyp").input_ids
    assert ids[0] == c.tokenizer.bos_token_id and ids[-1] == c.tokenizer.eos_token_id
    assert c.tokenizer.unk_token_id not in ids[1:-1]
    # The hub's CLIP configs say eos 2: transformers then pools at argmax(input_ids), which is the
    # real end-of-text token only because it has the highest id (as in CLIP's 49408 vocabulary).
    assert c.tokenizer.eos_token_id == len(c.tokenizer) - 1 and c.text_encoder.config.eos_token_id == 2
    # SD 1.5's file has no scaling_factor: diffusers' default is SD's 0.18215.
    assert bb.vae_scale(c.vae) == 8 and c.vae.config.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025}[kind]
    assert DDPMScheduler.from_config(c.scheduler.config).config.clip_sample is False
    assert c.scheduler.config.prediction_type == "epsilon"
    if kind == "sd15":
        assert type(c.scheduler).__name__ == "PNDMScheduler"
        # diffusers 0.6's attention_head_dim 8 means 8 heads: 40-wide at 320 channels.
        assert c.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 8
    else:
        assert type(c.scheduler).__name__ == "EulerDiscreteScheduler"
        assert isinstance(c.text_encoder_2, CLIPTextModelWithProjection)
        assert c.tokenizer_2.pad_token == "!" and c.tokenizer_2.model_max_length == 77
        assert c.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 10
        assert c.vae.config.force_upcast is True


def test_encode_matches_the_stock_pipeline(kind, loaded):
    """Conditioning as encode_prompt makes it; for SDXL, hidden_states[-2] is a layer's output (2 layers)."""
    recipe, c = loaded
    from medsynth.models.backbone import get

    bb = get(c.family)
    pipe = bb.stock_pipeline(c)
    prompts = ["an endoscopic image of polyps", "an image of normal cecum"]
    with torch.no_grad():
        ours = bb.encode(c, prompts, 77, "cpu")
        empty = bb.encode(c, [""], 77, "cpu")
        if kind == "sd15":
            pe, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        else:
            pe, _, pp, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            torch.testing.assert_close(ours["pooled"], pp, rtol=0, atol=0)
            assert ours["pooled"].shape == (2, 1280) and ours["embeds"].shape == (2, 77, 2048)
            # The penultimate state of a 2-layer encoder is layer 1's output, not the token embeddings.
            ids = c.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            states = c.text_encoder(ids, output_hidden_states=True).hidden_states
            assert len(states) == 3 and torch.equal(ours["embeds"][..., :768], states[1])
            assert (states[1] - states[0]).abs().max() > 1e-3
            assert empty["embeds"].abs().max() == 0 and empty["pooled"].abs().max() == 0  # force_zeros_for_empty_prompt
    torch.testing.assert_close(ours["embeds"], pe, rtol=0, atol=0)
    assert (ours["embeds"][0] - ours["embeds"][1]).abs().max() > 1e-3


# SDXL's in the default run (its conditioning differs most from the tiny base's); SD 1.5's too with -m slow.
@pytest.mark.parametrize("kind", [pytest.param("sd15", marks=pytest.mark.slow), "sdxl"], scope="module")
def test_generate_matches_the_stock_pipeline(kind, loaded):
    from diffusers import DPMSolverMultistepScheduler

    from medsynth import sampling
    from medsynth.models.backbone import get

    recipe, c = loaded
    bb = get(c.family)
    prompts, seeds, steps, guidance = ["An endoscopic image of a red polyp"], [3], 2, 4.5
    ours = sampling.generate(bb, c, prompts, seeds, resolution=RES, steps=steps, guidance=guidance, max_length=77,
                             negative_prompt="blurry", batch_size=1, device="cpu", dtype=torch.float32)
    pipe = bb.stock_pipeline(c, DPMSolverMultistepScheduler.from_config(c.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    lat = sampling.seeded_noise(seeds, (4, RES // 8, RES // 8), "cpu")
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt=["blurry"], latents=lat, num_inference_steps=steps,
                      guidance_scale=guidance, height=RES, width=RES, output_type="pt").images * 2 - 1
    diff = (ours - theirs).abs().max().item()
    print(f"{kind}: max |generate - stock pipeline| = {diff:.3g}")
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("kind", ["sdxl"], scope="module")
def test_sdxl_fp16_decodes_in_fp32(kind, root, tmp_path):
    """model.dtype fp16 through medsynth's synthesis path (the backbone's stock pipeline): SDXL's VAE config says
    force_upcast, so the decode runs with fp32 VAE weights and the VAE is back in fp16 afterwards. (Random weights
    do not overflow in fp16, so this checks the dtype of the decode, not the overflow itself.)"""
    from medsynth.models import loading
    from medsynth.models.backbone import get

    c = loading.load_components(_recipe(root, tmp_path, "model.dtype=fp16"))
    bb = get(c.family)
    assert c.vae.dtype == torch.float16 and c.vae.config.force_upcast
    seen = []
    c.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append((next(m.parameters()).dtype, a[0].dtype)))
    pipe = bb.stock_pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond, neg = bb.encode(c, ["an endoscopic image of polyps"], 77, "cpu"), bb.encode(c, [""], 77, "cpu")
        lat = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0)).half()
        img = bb.pipeline_generate(pipe, cond, neg, lat, steps=1, guidance=4.5, resolution=RES)
    assert seen == [(torch.float32, torch.float32)]
    assert c.vae.dtype == torch.float16 and img.shape == (1, RES, RES, 3) and np.isfinite(img).all()
