"""The `sana` family (SanaPipeline: SanaTransformer2DModel + Gemma-2 + AutoencoderDC, rectified flow)
on its tiny base: layout and detection, sampler parity with SanaPipeline, the flow-matching training
target, HLDF gradients into the transformer LoRA, `medsynth run` through score, and the diffusers LoRA
file loading with `pipe.load_lora_weights`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from _family import assert_quiet, assert_stock_parity, cli_env, family_recipe, load_comps, synthesized
from conftest import SHARED_DATA, run_cli
from test_finetune_cli import _read_log, _sets, _subset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SANA = {"finetune.adapter": "lora", "model.max_text_tokens": 24, "model.tiny.heads": 2, "model.tiny.head_dim": 8,
        "model.tiny.text_dim": 32, "synthesize.per_class": 2, "synthesize.steps": 3, "classify.epochs": 1,
        "classify.image_size": 32, "classify.batch_size": 8}


def _recipe(tmp: Path, data: Path, **extra):
    # model.base 'tiny' needs model.family 'sana'; the built directory (extra model.base) is detected
    # from its model_index.json, which the CLI runs below rely on.
    return family_recipe(tmp, data, SANA, **({} if "model.base" in extra else {"model.family": "sana"}), **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(tmp, data, recipe on the built base dir, base dir): a prepared 3-class HyperKvasir subset and
    its tiny Sana base, built once for the module through resolve_base (model.base 'tiny')."""
    from medsynth.models.loading import resolve_base

    tmp = tmp_path_factory.mktemp("sana")
    data = _subset(SHARED_DATA / "hyperkvasir", tmp / "data")
    r = run_cli("prepare", "demo", *_sets(tmp, data, **SANA), env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    root = Path(resolve_base(_recipe(tmp, data)))
    return tmp, data, _recipe(tmp, data, **{"model.base": str(root)}), root


def test_tiny_base_is_a_sana_pipeline(base):
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Model, GemmaTokenizer

    from medsynth.models.backbone import family_of, for_recipe
    from medsynth.models.sana import BACKBONE

    tmp, data, recipe, root = base
    assert root.name.startswith("sana-")
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderDC"] and index["text_encoder"] == ["transformers", "Gemma2Model"]
    for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (root / part).is_dir(), part
    # Detected from model_index.json alone, as a downloaded Sana base would be.
    assert family_of(recipe) == "sana" and for_recipe(recipe).name == "sana"
    c = load_comps(recipe)
    assert isinstance(c.transformer, SanaTransformer2DModel) and isinstance(c.text_encoder, Gemma2Model)
    assert isinstance(c.vae, AutoencoderDC) and isinstance(c.tokenizer, GemmaTokenizer)
    ids = c.tokenizer("an endoscopic image of polyps").input_ids
    assert ids[0] == c.tokenizer.bos_token_id == 2 and c.tokenizer.pad_token_id == 0
    assert c.tokenizer.unk_token_id not in ids and c.tokenizer.eos_token_id not in ids
    s = c.scheduler.config
    assert c.scheduler.__class__.__name__ == "DPMSolverMultistepScheduler"
    assert s.use_flow_sigmas and s.prediction_type == "flow_prediction" and s.flow_shift == 3.0
    # The autoencoder answers the finetune loop's encode(x).latent_dist with DC-AE's deterministic latent.
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = c.vae.encode(x).latent_dist
        assert torch.equal(dist.mode(), AutoencoderDC.encode(c.vae, x).latent)
    c.vae.enable_gradient_checkpointing()  # AutoencoderDC's own raises; finetune asks every VAE
    pipe = SanaPipeline.from_pretrained(str(root))
    assert BACKBONE.vae_scale(c.vae) == pipe.vae_scale_factor == 8


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_generate_matches_sana_pipeline(base, negative):
    from diffusers import DPMSolverMultistepScheduler

    from medsynth import sampling
    from medsynth.models.sana import BACKBONE

    c = load_comps(base[2])
    prompts, seeds, res, steps, guidance = ["An Endoscopic image of a Red polyp", "an image of stool"], [3, 4], 32, 4, 4.5
    ours = sampling.generate(BACKBONE, c, prompts, seeds, resolution=res, steps=steps, guidance=guidance,
                             max_length=24, negative_prompt=negative, batch_size=2, device="cpu", dtype=torch.float32)
    pipe = BACKBONE.stock_pipeline(c, DPMSolverMultistepScheduler.from_config(c.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    lat = sampling.seeded_noise(seeds, (c.transformer.config.in_channels, res // 8, res // 8), "cpu")
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt=negative, latents=lat, num_inference_steps=steps,
                      guidance_scale=guidance, height=res, width=res, max_sequence_length=24,
                      complex_human_instruction=None, use_resolution_binning=False, output_type="pt").images * 2 - 1
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - SanaPipeline| = {diff:.3g}")
    assert diff <= 1e-4, diff
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_training_is_flow_matching():
    """Noising and target as diffusers' Sana training script: x_t = (1 - s) x0 + s noise with
    s = t / 1000 (FlowMatchEulerDiscreteScheduler's table), target noise - x0; and the sampler
    inverts it (DPM-Solver++ turns the exact velocity back into x0)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from medsynth import sampling
    from medsynth.models.sana import BACKBONE, SANA_SCHEDULER

    cfg = DPMSolverMultistepScheduler(**SANA_SCHEDULER).config
    train = BACKBONE.training_scheduler(cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([1, 500, 999])
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    want = torch.cat([ref.scale_noise(x0[i:i + 1], t[i:i + 1].float(), noise[i:i + 1]) for i in range(3)])
    xt = train.add_noise(x0, noise, t)
    assert torch.allclose(xt, want, atol=1e-6)
    v = sampling.training_target(train, x0, noise, t)
    assert torch.equal(v, noise - x0)
    # The sampler's view: given the exact velocity, its first (DDIM-like) step lands on the same
    # straight path at the next noise level; the transformer's timestep there is 1000 sigma.
    s = sampling.make_scheduler(cfg, 4)
    s0, s1 = float(s.sigmas[0]), float(s.sigmas[1])
    x1 = s.step(noise - x0, s.timesteps[0], (1 - s0) * x0 + s0 * noise, return_dict=False)[0]
    assert torch.allclose(x1, (1 - s1) * x0 + s1 * noise, atol=1e-5)
    assert float(s.timesteps[0]) == pytest.approx(s0 * 1000, abs=1)


def test_hldf_colour_loss_reaches_transformer_lora(base):
    from medsynth.finetune import hldf, lora
    from medsynth.models.sana import BACKBONE as BB, DIT_TARGETS
    from medsynth.recipe import HldfConfig
    from test_finetune_helpers import lora_settings

    c = load_comps(base[2])
    lora.add_lora(c.transformer, lora_settings(rank=4), DIT_TARGETS["paper"], "transformer")
    c.vae.requires_grad_(False)
    c.text_encoder.requires_grad_(False)
    with torch.no_grad():  # B starts at zero, which zeroes A's gradient: give B a trained-like value
        for n, p in c.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    cond = BB.encode(c, ["an endoscopic image of polyps", "an endoscopic image of stool"], 24, "cpu")
    neg = BB.encode(c, ["", ""], 24, "cpu")
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    m, s = hldf.colour_stats(real)
    r = hldf.hldf_step(BB, c.transformer, c.vae, c.scheduler.config, HldfConfig(steps=3, guidance=4.5), cond, neg, m, s,
                       torch.Generator().manual_seed(0), (2, c.transformer.config.in_channels, 4, 4))
    r.loss.backward()
    grads = {n: p.grad for n, p in c.transformer.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(".attn1.to_q." in n for n in grads) and any(".attn2.to_v." in n for n in grads)
    nonzero = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert len(nonzero) > len(grads) // 2, f"only {len(nonzero)}/{len(grads)} LoRA tensors got a gradient"
    assert all(p.grad is None for p in c.text_encoder.parameters())


_STDERR: dict[str, str] = {}


@pytest.fixture(scope="module")
def ran(base):
    """`medsynth run` prepare -> score on the built Sana base (named by its directory), LoRA on the
    transformer, HLDF on, gradient checkpointing on (the default of real recipes)."""
    tmp, data, _, root = base
    # alpha != rank: the diffusers LoRA file must carry the scale (alpha / r = 2), not leave it to the loader's default.
    run = {"model.base": str(root), "finetune.max_steps": 4, "finetune.lora.alpha": 16,
           "finetune.gradient_checkpointing": "true"}
    r = run_cli("-q", "run", "demo", *_sets(tmp, data, **SANA, **run), env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    _STDERR["run"] = r.stderr
    return tmp, data, _recipe(tmp, data, **run)


def test_quiet_run_prints_no_library_chatter(ran):
    """-q: no weight-loading progress bars, library log lines or library Future/Deprecation warnings."""
    assert_quiet(_STDERR["run"])


def test_run_completes_through_score_with_colour_loss(ran):
    tmp, _, recipe = ran
    ws = tmp / "ws"
    log = _read_log(ws)
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert "loss/color_mean" in log[3] and "loss/color_mean" not in log[0]  # HLDF every 4 steps, logged apart
    info = json.loads((ws / "finetune" / "final" / "adapter.json").read_text())
    assert info["family"] == "sana" and info["denoiser"] == "transformer" and info["text_encoders"] == []
    assert info["transformer_targets"] == ["to_q", "to_k", "to_v"]
    assert (ws / "finetune" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "finetune.lora.text_encoder: true is ignored for model.family 'sana'" in _STDERR["run"]
    shards = sorted((ws / "synthetic").glob("synth-*.tar"))
    assert shards and (ws / "score" / "scores.json").is_file()


def test_load_lora_weights_gives_the_synthesized_images(ran):
    """A user's SanaPipeline + pipe.load_lora_weights(final/) == medsynth's synthesis path."""
    from diffusers import SanaPipeline

    tmp, _, r = ran
    ws, final = tmp / "ws", tmp / "ws" / "finetune" / "final"
    s, m = r.synthesize, r.model
    samples, prompts, ours, noise = synthesized(r, ws, final, s.per_class)
    pipe = SanaPipeline.from_pretrained(r.model.base, dtype=torch.float32)
    args = dict(prompt=[prompts[x.key] for x in samples], negative_prompt=s.negative_prompt, latents=noise,
                num_inference_steps=s.steps, guidance_scale=s.guidance, height=m.resolution, width=m.resolution,
                max_sequence_length=m.max_text_tokens, complex_human_instruction=None, use_resolution_binning=False,
                output_type="np")
    assert_stock_parity(pipe, args, lambda p: p.load_lora_weights(str(final)), ours, "load_lora_weights pipeline",
                        min_change=1e-3)


# ----------------------------------------------------------------------------- real-shaped Sana 600M 512 px
# The hub's layout and configs at full width, one block each, seeded random weights: what the tiny base
# never does (DC-AE at x32 with its real widths, Gemma-2-2B's GQA / head 256 / soft-capping at width
# 2304 from bf16 shards, the hub tokenizer's left padding and "infinite" model_max_length, the 600M
# transformer's 36 x 32 / 16 x 72 attention over 2304-wide captions). Built once per machine into
# $TMPDIR/medsynth-real-shaped-sana-v<RS_FORMAT> (~1 GB). Slow: ~1-2 min on one core.

RS_FORMAT = 1
RS_INFO = "real_shaped.json"
# transformer/config.json of Efficient-Large-Model/Sana_600M_512px_diffusers as diffusers'
# convert_sana_to_diffusers.py writes it for SanaMS_600M_P1_D28 at 512 px (checked), 1 block instead of 28.
RS_TRANSFORMER = {"in_channels": 32, "out_channels": 32, "num_attention_heads": 36, "attention_head_dim": 32,
                  "num_layers": 1, "num_cross_attention_heads": 16, "cross_attention_head_dim": 72,
                  "cross_attention_dim": 1152, "caption_channels": 2304, "mlp_ratio": 2.5, "attention_bias": False,
                  "sample_size": 16, "patch_size": 1, "norm_elementwise_affine": False, "norm_eps": 1e-6,
                  "interpolation_scale": None}
# text_encoder/config.json: Gemma-2-2B-it's decoder (from memory: hidden 2304, 8 heads / 4 KV heads of 256,
# FFN 9216, soft-capping 50 / 30, window 4096, query scale 256, 26 layers, vocab 256000), saved in bf16.
# Cuts: 1 layer; vocabulary 4096 rows (the full 256000 x 2304 embedding is 2.4 GB in fp32; no path depends on it).
RS_GEMMA = {"vocab_size": 4096, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 1,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention_bias": False,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
# vae/config.json: mit-han-lab/dc-ae-f32c32-sana-1.0 (checked: diffusers' convert_dcae_to_diffusers.py),
# 1 layer per level instead of (2, 2, 2, 3, 3, 3) / 3.
RS_DCAE = {"in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
           "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                                   "EfficientViTBlock"],
           "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                                   "EfficientViTBlock"],
           "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
           "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
           "encoder_layers_per_block": [1] * 6, "decoder_layers_per_block": [1] * 6,
           "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
           "downsample_block_type": "conv", "upsample_block_type": "interpolate", "decoder_norm_types": "rms_norm",
           "decoder_act_fns": "silu", "scaling_factor": 0.41407}
HUGE = 1000000000000000019884624838656  # the hub tokenizer's model_max_length


def _rs_build(out: Path) -> dict:
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    import real_shaped
    from medsynth.models.sana import SANA_SCHEDULER, train_gemma_tokenizer

    t0 = time.time()
    # The hub tokenizer pads on the left and has no real limit; SanaPipeline sets right padding itself.
    tok = train_gemma_tokenizer(real_shaped.corpus(), 1500, model_max_length=HUGE, padding_side="left")
    torch.manual_seed(0)
    tr = SanaTransformer2DModel(**RS_TRANSFORMER)
    te = Gemma2Model(Gemma2Config(**RS_GEMMA)).to(torch.bfloat16).eval()
    vae = AutoencoderDC(**RS_DCAE).eval()
    pipe = SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr,
                        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER))
    pipe.save_pretrained(str(out), safe_serialization=True, max_shard_size="100MB")  # sharded bf16 Gemma + index
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"seconds": round(time.time() - t0, 1), "parameters": {"transformer": count(tr), "text_encoder": count(te),
                                                                  "vae": count(vae)}}


def _rs_ensure() -> Path:
    """The real-shaped Sana directory, built on first use (temp dir renamed into place)."""
    import os
    import shutil
    import tempfile

    final = Path(tempfile.gettempdir()) / f"medsynth-real-shaped-sana-v{RS_FORMAT}" / "Sana_600M_512px-s0"
    if (final / RS_INFO).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        info = _rs_build(tmp)
        (tmp / RS_INFO).write_text(json.dumps({**info, "format": RS_FORMAT}, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / RS_INFO).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="module")
def rs_base() -> Path:
    t0 = time.time()
    root = _rs_ensure()
    print(f"real-shaped Sana ready in {time.time() - t0:.1f} s: {(root / RS_INFO).read_text()}")
    return root


@pytest.mark.slow
def test_real_shaped_sana_finetune_synthesize_and_lora_file(rs_base, tmp_path):
    """`medsynth finetune` (LoRA, HLDF at both of 2 steps, gradient checkpointing, 64 px = 2 x 2 DC-AE
    latents) and `synthesize` on the real-shaped base; the stock SanaPipeline from the directory with
    pipe.load_lora_weights(final/) gives medsynth's images."""
    from diffusers import SanaPipeline

    from test_real_shaped import CLASSES, _check_synthetic, _prepare, _sets as rs_sets

    _prepare(tmp_path, rs_base)
    r = run_cli("finetune", "demo", "--max-steps", "2", *rs_sets(tmp_path, rs_base), env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    log = _read_log(tmp_path / "ws")
    assert [x["step"] for x in log] == [1, 2] and all("loss/color_mean" in x for x in log)
    final = tmp_path / "ws" / "finetune" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    r = run_cli("synthesize", "demo", "--per-class", "1", *rs_sets(tmp_path, rs_base), env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    _check_synthetic(tmp_path / "ws" / "synthetic", 1)

    from medsynth.recipe import load_recipe

    rec = load_recipe("demo", [x for x in rs_sets(tmp_path, rs_base) if x != "--set"])
    s, m = rec.synthesize, rec.model
    samples, prompts, ours, noise = synthesized(rec, tmp_path / "ws", final, 1)
    pipe = SanaPipeline.from_pretrained(str(rs_base), dtype=torch.float32)
    assert pipe.vae_scale_factor == 32 and len(CLASSES) == len(samples)
    args = dict(prompt=[prompts[x.key] for x in samples], negative_prompt=s.negative_prompt, latents=noise,
                num_inference_steps=s.steps, guidance_scale=s.guidance, height=m.resolution, width=m.resolution,
                max_sequence_length=m.max_text_tokens, complex_human_instruction=None, use_resolution_binning=False,
                output_type="np")
    assert_stock_parity(pipe, args, lambda p: p.load_lora_weights(str(final)), ours, "real-shaped load_lora_weights",
                        min_change=1e-6)


@pytest.mark.slow
def test_real_shaped_sana_loads_and_generate_matches_pipeline(rs_base, tmp_path):
    from diffusers import SanaPipeline
    from transformers import Gemma2Model

    from medsynth import sampling
    from medsynth.models.backbone import for_recipe
    from medsynth.models.loading import check_base, load_components
    from medsynth.recipe import load_recipe
    from test_real_shaped import _sets as rs_sets

    rec = load_recipe("demo", [x for x in rs_sets(tmp_path, rs_base) if x != "--set"])
    check_base(rec)
    bb = for_recipe(rec)
    assert bb.name == "sana"
    c = load_components(rec, device="cpu", dtype=torch.float32)
    assert isinstance(c.text_encoder, Gemma2Model) and c.text_encoder.dtype == torch.float32
    assert bb.vae_scale(c.vae) == 32 and c.tokenizer.padding_side == "left"
    cond = bb.encode(c, ["A Polyp", "a red ulcer with ill-defined borders"], 16, "cpu")
    assert cond["embeds"].shape == (2, 16, 2304) and cond["mask"][:, 0].eq(1).all()  # right-padded: <bos> first
    prompts, seeds, res, steps = ["an endoscopic image of a polyp", "a red ulcer"], [1, 2], 64, 3
    ours = sampling.generate(bb, c, prompts, seeds, resolution=res, steps=steps, guidance=4.5, max_length=16,
                             batch_size=2, device="cpu", dtype=torch.float32)
    pipe = SanaPipeline.from_pretrained(str(rs_base), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lat = sampling.seeded_noise(seeds, (32, 2, 2), "cpu")
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt="", latents=lat, num_inference_steps=steps, guidance_scale=4.5,
                      height=res, width=res, max_sequence_length=16, complex_human_instruction=None,
                      use_resolution_binning=False, output_type="pt").images * 2 - 1
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - SanaPipeline| (real-shaped) = {diff:.3g}")
    assert diff <= 1e-4, diff
