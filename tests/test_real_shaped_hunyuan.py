"""medsynth on a real-shaped Hunyuan-DiT v1.2 base (tests/real_shaped_hunyuan.py): the hub's layout and
configs at full width with 1-4 layers and random weights, driven through the recipe / CLI machinery.

What the tiny Hunyuan base never does and these do: v1.2's DiT without style / size conditioning, at
hidden 1408 with a long skip (block 0 -> 3), mlp_ratio 4.3637, the BERT text tower at width 1024 and
mT5-XL's width 2048 (``model_type`` mt5 read into T5EncoderModel, fp16 shards), the hub's tokenizer
files (vocab.txt + configs, spiece.model + configs, model_max_length "infinite"), the SDXL VAE
(scaling 0.13025) and the v-prediction DDPM config with the pipeline's extra null components.
Nothing here says anything about image quality (the weights are random).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import real_shaped_hunyuan as rs
from _family import assert_stock_parity, synthesized
from conftest import ONE_THREAD, run_cli
from test_real_shaped import CLASSES, RES, _check_synthetic, _prepare, _sets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3  # sampling steps of the parity checks


@pytest.fixture(scope="session")
def base() -> Path:
    t0 = time.time()
    root = rs.ensure("hunyuan-dit")
    print(f"real-shaped Hunyuan-DiT ready in {time.time() - t0:.1f} s: {rs.info(root)}")
    return root


def _recipe(tmp: Path, base: Path, **extra):
    from medsynth.recipe import load_recipe

    return load_recipe("demo", [x for x in _sets(tmp, base, **extra) if x != "--set"])


# ----------------------------------------------------------------------------- end to end (CLI)
# First in the file: they run before the module fixture below loads the base into this process.
# Slow (~25 s each on one core): the default suite keeps the fixture build, layout, loading and the
# gradient-checkpointing check within its budget; run them with `pytest -m slow`.


@pytest.fixture(scope="module")
def finetuned(base, tmp_path_factory):
    """`medsynth finetune` for 2 steps: LoRA on the DiT, HLDF (2 solver steps) at both steps, batch 1,
    64 px, gradient checkpointing, a sample grid at step 2."""
    tmp = tmp_path_factory.mktemp("rs-hunyuan")
    _prepare(tmp, base)
    r = run_cli("finetune", "demo", "--max-steps", "2", *_sets(tmp, base), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, r.stderr


@pytest.mark.slow
def test_finetunes_two_steps_with_hldf_and_writes_a_sample_grid(finetuned):
    """Before the fix (hunyuan_dit.with_gradient_checkpointing) this failed with "HunyuanDiT2DModel does
    not support gradient checkpointing" (finetune.gradient_checkpointing is true by default)."""
    from PIL import Image

    tmp, stderr = finetuned
    ft = tmp / "ws" / "finetune"
    log = [json.loads(x) for x in (ft / "log.jsonl").read_text().splitlines() if x.strip()]
    assert [x["step"] for x in log] == [1, 2]
    for x in log:
        assert x["loss/diffusion"] > 0 and x["loss/color_mean"] > 0 and x["loss/hldf"] > 0
    grid = Image.open(ft / "samples" / "step-0000002.png")
    assert grid.size == (RES + 2 * 2, len(CLASSES) * RES + 3 * 2)
    info = json.loads((ft / "final" / "adapter.json").read_text())
    assert info["family"] == "hunyuan-dit" and info["text_encoders"] == []
    assert sorted(p.name for p in (ft / "final").iterdir() if p.is_dir()) == ["transformer"]
    assert "finetune.lora.text_encoder: true is ignored for model.family 'hunyuan-dit'" in stderr


@pytest.mark.slow
def test_synthesize_writes_images_and_load_finetuned_gives_them(finetuned, base):
    """`medsynth synthesize` writes the images; a stock HunyuanDiTPipeline + medsynth.load_finetuned
    gives medsynth's images (<= 1e-4) from the same noise."""
    from diffusers import DPMSolverMultistepScheduler, HunyuanDiTPipeline

    import medsynth

    tmp, _ = finetuned
    r = run_cli("--json", "synthesize", "demo", "--per-class", "1", *_sets(tmp, base), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-4000:]
    _check_synthetic(tmp / "ws" / "synthetic", per_class=1)

    rec = _recipe(tmp, base)
    ws, s, m = tmp / "ws", rec.synthesize, rec.model
    samples, prompts, ours, noise = synthesized(rec, ws, ws / "finetune" / "final", 1)
    pipe = HunyuanDiTPipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    args = dict(prompt=[prompts[x.key] for x in samples], negative_prompt=[s.negative_prompt] * len(samples),
                latents=noise, num_inference_steps=s.steps, guidance_scale=s.guidance, height=m.resolution,
                width=m.resolution, use_resolution_binning=False, output_type="np")
    # min_change 0: the adapter must reach the stock pipeline (2 random-weight LoRA steps change little).
    assert_stock_parity(pipe, args, lambda p: medsynth.load_finetuned(p, ws / "finetune"), ours,
                        "load_finetuned pipeline", min_change=0.0)


# ----------------------------------------------------------------------------- layout and loading


def test_layout_is_the_hub_layout(base):
    assert json.loads((base / "model_index.json").read_text()) == rs.MODEL_INDEX
    cfg = json.loads((base / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "HunyuanDiT2DModel"
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["patch_size"],
            cfg["in_channels"], cfg["learn_sigma"], cfg["cross_attention_dim"], cfg["cross_attention_dim_t5"],
            cfg["pooled_projection_dim"], cfg["text_len"], cfg["text_len_t5"],
            cfg["use_style_cond_and_image_meta_size"]) == (1408, 16, 88, 2, 4, True, 1024, 2048, 1024, 77, 256, False)
    assert cfg["num_layers"] % 2 == 0 and 2 < cfg["num_layers"] <= 4  # an even count with one long skip
    bert = json.loads((base / "text_encoder" / "config.json").read_text())
    assert (bert["hidden_size"], bert["num_attention_heads"], bert["num_hidden_layers"]) == (1024, 16, 1)
    t5 = json.loads((base / "text_encoder_2" / "config.json").read_text())
    assert (t5["d_model"], t5["d_ff"], t5["num_heads"], t5["feed_forward_proj"], t5["model_type"], t5["num_layers"]) \
        == (2048, 5120, 32, "gated-gelu", "mt5", 1)
    assert (base / "text_encoder_2" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in (base / "tokenizer").iterdir()) == \
        ["special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    assert sorted(p.name for p in (base / "tokenizer_2").iterdir()) == \
        ["special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    vae = json.loads((base / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["block_out_channels"] == [128, 256, 512, 512]
    sch = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert (sch["_class_name"], sch["prediction_type"], sch["beta_schedule"], sch["beta_start"], sch["steps_offset"]) \
        == ("DDPMScheduler", "v_prediction", "scaled_linear", 0.00085, 1)
    assert rs.info(base)["bytes"] < 2.5e9


def test_family_is_detected_from_model_index(base, tmp_path):
    from medsynth.models.backbone import family_of, for_recipe

    r = _recipe(tmp_path, base)
    assert r.model.family is None and family_of(r) == "hunyuan-dit" and for_recipe(r).name == "hunyuan-dit"


@pytest.fixture(scope="module")
def loaded(base, tmp_path_factory):
    from medsynth.models import loading

    tmp = tmp_path_factory.mktemp("rs-hunyuan-load")
    rec = _recipe(tmp, base)
    return rec, loading.load_components(rec, device="cpu", dtype=torch.float32)


def test_loader_loads_every_part(loaded):
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel
    from transformers import BertModel, T5EncoderModel

    _, c = loaded
    assert isinstance(c.transformer, HunyuanDiT2DModel) and isinstance(c.vae, AutoencoderKL)
    assert isinstance(c.text_encoder, BertModel) and isinstance(c.text_encoder_2, T5EncoderModel)
    assert isinstance(c.scheduler, DDPMScheduler) and c.scheduler.config.prediction_type == "v_prediction"
    # Training noise and sampling follow the base's own scheduler config (v1.2's beta_end), not the tiny
    # base's v1.1 copy in medsynth.
    from medsynth.models.hunyuan_dit import BACKBONE as BB, HUNYUAN_SCHEDULER

    assert rs.SCHEDULER_CONFIG["beta_end"] != HUNYUAN_SCHEDULER["beta_end"]
    for sch in (BB.training_scheduler(c.scheduler.config), BB.sampling_scheduler(c.scheduler.config)):
        assert (sch.config.beta_end, sch.config.prediction_type, sch.config.steps_offset) == \
            (rs.SCHEDULER_CONFIG["beta_end"], "v_prediction", 1)
    # fp16 shards on disk, loaded in model.dtype; the mT5 config (model_type mt5) read by T5EncoderModel.
    assert next(c.text_encoder_2.parameters()).dtype == torch.float32
    assert c.text_encoder_2.config.d_model == 2048 and c.text_encoder_2.config.is_gated_act
    # v1.2: no style / size embedder; the long skip of block 0 lands in the last block.
    assert not hasattr(c.transformer.time_extra_emb, "style_embedder")
    assert c.transformer.blocks[-1].skip_linear is not None and c.transformer.blocks[0].skip_linear is None
    for tok in (c.tokenizer, c.tokenizer_2):
        ids = tok("An endoscopic image of a red polyp").input_ids
        assert tok.unk_token_id not in ids, (type(tok).__name__, ids)
    bert_ids = c.tokenizer("a red polyp").input_ids
    assert bert_ids[0] == 101 and bert_ids[-1] == 102  # [CLS] ... [SEP] at Chinese-BERT's ids
    assert c.tokenizer_2("a red polyp").input_ids[-1] == 1  # mT5's </s>


def test_encode_gives_both_conditionings_at_their_fixed_lengths_and_no_dropout(loaded):
    from medsynth.models.hunyuan_dit import BACKBONE as BB

    _, c = loaded
    # max_length is the recipe's model.max_text_tokens (16 here): Hunyuan's lengths are fixed by the DiT.
    a = BB.encode(c, ["an endoscopic image of polyps"], 16, "cpu")
    b = BB.encode(c, ["an endoscopic image of polyps"], 16, "cpu")
    assert a["embeds"].shape == (1, 77, 1024) and a["embeds_t5"].shape == (1, 256, 2048)
    assert a["mask"].shape == (1, 77) and a["mask_t5"].shape == (1, 256)
    # dropout_rate / hidden_dropout_prob 0.1 in the hub configs: the frozen encoders run in eval mode.
    assert torch.equal(a["embeds"], b["embeds"]) and torch.equal(a["embeds_t5"], b["embeds_t5"])


@pytest.mark.slow
def test_sampling_matches_the_stock_pipeline(loaded, base):
    """medsynth's sampler on the real-shaped base == HunyuanDiTPipeline loaded by diffusers from the same
    directory (its own tokenizer classes from model_index.json), use_resolution_binning=False."""
    from diffusers import DPMSolverMultistepScheduler, HunyuanDiTPipeline

    from medsynth import sampling
    from medsynth.models.hunyuan_dit import BACKBONE as BB

    _, c = loaded
    prompts, seeds, guidance = ["An endoscopic image of a red polyp", "a normal cecum"], [3, 4], 4.5
    ours = sampling.generate(BB, c, prompts, seeds, resolution=RES, steps=STEPS, guidance=guidance, max_length=16,
                             negative_prompt="", batch_size=2, device="cpu", dtype=torch.float32)
    pipe = HunyuanDiTPipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lat = sampling.seeded_noise(seeds, (4, RES // 8, RES // 8), "cpu")
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt=[""] * 2, latents=lat, num_inference_steps=STEPS,
                      guidance_scale=guidance, height=RES, width=RES, use_resolution_binning=False,
                      output_type="pt").images * 2 - 1
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - HunyuanDiTPipeline| on the real-shaped base = {diff:.3g}")
    assert diff <= 1e-4, diff
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_gradient_checkpointing_is_supported_and_gives_the_same_gradients(loaded):
    """diffusers' HunyuanDiT2DModel refuses enable_gradient_checkpointing() (the recipe default, which
    made `medsynth finetune` fail on every Hunyuan-DiT base); medsynth's loader gives it per-block
    checkpointing, which must not change the outputs or the gradients (long skip included)."""
    from medsynth.models.hunyuan_dit import BACKBONE as BB

    _, c = loaded
    tr = c.transformer
    cond = BB.encode(c, ["an endoscopic image of polyps"], 16, "cpu")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    watch = [tr.blocks[0].attn1.to_q.weight, tr.blocks[-1].skip_linear.weight, tr.pos_embed.proj.weight]

    def grads():
        tr.zero_grad(set_to_none=True)
        out = BB.predict(tr, x, torch.tensor([500]), cond, (RES, RES))
        out.square().mean().backward()
        return out.detach(), [w.grad.clone() for w in watch]

    tr.requires_grad_(False)
    for w in watch:
        w.requires_grad_(True)
    try:
        out0, g0 = grads()
        tr.enable_gradient_checkpointing()
        assert all(b.gradient_checkpointing for b in tr.blocks)
        out1, g1 = grads()
    finally:
        tr.disable_gradient_checkpointing()
        tr.requires_grad_(False)
        tr.zero_grad(set_to_none=True)
    assert torch.equal(out0, out1)
    for a, b in zip(g0, g1):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
