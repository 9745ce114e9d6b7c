"""medsynth on real-shaped PixArt-alpha bases (tests/real_shaped.py): the hub layout and configs at full
width with 1-2 layers and random weights, driven through the normal recipe / CLI machinery.

These take the code paths that pretrained weights take and the tiny base never does: the 1024-MS
micro-conditions, T5 v1.1 at XXL width with dropout 0.1, a tokenizer built from spiece.model alone,
the SD VAE, the legacy ``Transformer2DModel`` config. They say nothing about image quality (the
weights are random); see docs/models.md "What is verified on real weights and what is not".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from medsynth.models import pixart

import real_shaped
from conftest import ONE_THREAD, SHARED_DATA, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("polyps", "normal-cecum")
RES = 64


@pytest.fixture(scope="session")
def bases() -> dict[str, Path]:
    """Both real-shaped bases, built once (cached on disk across sessions, keyed by FORMAT)."""
    t0 = time.time()
    roots = {k: real_shaped.ensure(k) for k in real_shaped.KINDS}
    print(f"real-shaped bases ready in {time.time() - t0:.1f} s: "
          + ", ".join(f"{k}: {real_shaped.info(r)}" for k, r in roots.items()))
    return roots


def _sets(tmp: Path, base: Path, **extra) -> list[str]:
    kv = {"data.root": str(tmp / "data"), "workdir": str(tmp / "ws"), "model.base": str(base),
          "model.resolution": RES, "model.dtype": "fp32", "model.device": "cpu", "model.max_text_tokens": 16,
          "modality": "endoscopic", "finetune.adapter": "lora", "finetune.gradient_checkpointing": "true",
          "finetune.batch_size": 1, "finetune.caption_dropout": 0.0,
          "finetune.hldf.enabled": "true", "finetune.hldf.every_n_steps": 1, "finetune.hldf.steps": 2,
          "finetune.checkpoint_every": 100, "finetune.sample_every": 2, "finetune.samples_per_class": 1,
          "finetune.log_every": 1, "synthesize.steps": 2, "synthesize.batch_size": 2,
          "synthesize.prompt_source": "simple"}
    kv.update(extra)
    out = []
    for k, v in kv.items():
        out += ["--set", f"{k}={v}"]
    return out


def _prepare(tmp: Path, base: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests expect ../shared/data beside the project")
    for c in CLASSES:
        (tmp / "data" / c).mkdir(parents=True)
        for f in sorted((SHARED_DATA / "hyperkvasir" / c).iterdir())[:3]:
            (tmp / "data" / c / f.name).symlink_to(f.resolve())
    r = run_cli("prepare", "demo", *_sets(tmp, base), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]


def _finetune_two_steps(tmp: Path, base: Path, **extra) -> list[dict]:
    _prepare(tmp, base)
    r = run_cli("finetune", "demo", "--max-steps", "2", *_sets(tmp, base, **extra), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-4000:]
    ft = tmp / "ws" / "finetune"
    log = [json.loads(x) for x in (ft / "log.jsonl").read_text().splitlines() if x.strip()]
    assert [x["step"] for x in log] == [1, 2]
    for x in log:  # HLDF ran at both steps and its colour loss is logged apart from the diffusion loss
        assert x["loss/color_mean"] > 0 and x["loss/color_std"] >= 0 and x["loss/hldf"] > 0
        assert x["loss/diffusion"] > 0
    from PIL import Image

    grid = Image.open(ft / "samples" / "step-0000002.png")
    assert grid.size == (RES + 2 * 2, len(CLASSES) * RES + 3 * 2)  # 2 classes x 1 sample, 2 px padding
    assert (ft / "final" / "adapter.json").is_file()
    return log


# ----------------------------------------------------------------------------- end to end (CLI)
# First in the file: they run before the module fixture below loads a base into this process,
# so at most one 1.3 GB T5 is in memory at a time.


def test_1024ms_finetunes_two_steps_with_hldf_and_writes_a_sample_grid(bases, tmp_path):
    """Acceptance: the micro-conditioned 1024-MS layout trains (diffusion + HLDF) and samples.

    Before the fix predict_noise read ``config.use_additional_conditions`` (None on the hub
    configs), passed no resolution / aspect ratio, and the DiT failed with
    "'NoneType' object has no attribute 'flatten'".
    """
    log = _finetune_two_steps(tmp_path, bases["1024-MS"])
    # The default reduction is the official code's channel mean; the recipe records it.
    cfg = (tmp_path / "ws" / "finetune" / "config.yaml").read_text()
    assert "channel_reduction: mean" in cfg and "base_dropout: false" in cfg
    assert len(log) == 2


def test_512_finetunes_with_hldf_then_synthesizes(bases, tmp_path):
    _finetune_two_steps(tmp_path, bases["512"], **{"finetune.hldf.channel_reduction": "sum"})
    r = run_cli("--json", "synthesize", "demo", "--per-class", "1", *_sets(tmp_path, bases["512"]), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-4000:]
    _check_synthetic(tmp_path / "ws" / "synthetic", per_class=1)


def _check_synthetic(out: Path, per_class: int) -> None:
    import tarfile

    from PIL import Image

    assert (out / "index.json").is_file()
    shards = sorted(out.glob("synth-*.tar"))
    assert shards, list(out.iterdir())
    pngs = []
    for s in shards:
        with tarfile.open(s) as tf:
            pngs += [Image.open(tf.extractfile(m)).copy() for m in tf.getmembers() if m.name.endswith(".png")]
    assert len(pngs) == per_class * len(CLASSES)
    assert all(im.size == (RES, RES) for im in pngs)


@pytest.mark.slow
def test_1024ms_bf16_finetune_and_synthesize(bases, tmp_path):
    """The bf16 autocast path (micro-conditions in the embeddings' dtype) on 1024-MS, then synthesis."""
    _finetune_two_steps(tmp_path, bases["1024-MS"], **{"finetune.mixed_precision": "bf16"})
    r = run_cli("--json", "synthesize", "demo", "--per-class", "2", *_sets(tmp_path, bases["1024-MS"]), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-4000:]
    _check_synthetic(tmp_path / "ws" / "synthetic", per_class=2)


# ----------------------------------------------------------------------------- layout and loading


def test_layout_is_the_hub_layout(bases):
    for kind, root in bases.items():
        assert json.loads((root / "model_index.json").read_text()) == real_shaped.MODEL_INDEX
        cfg = json.loads((root / "transformer" / "config.json").read_text())
        assert cfg["_class_name"] == "Transformer2DModel"
        assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["caption_channels"],
                cfg["cross_attention_dim"], cfg["in_channels"], cfg["out_channels"], cfg["patch_size"]) == \
            (16, 72, 4096, 1152, 4, 8, 2)
        assert cfg["sample_size"] == {"512": 64, "1024-MS": 128}[kind] and 1 <= cfg["num_layers"] <= 2
        assert "use_additional_conditions" not in cfg  # as on the hub: diffusers derives it from sample_size
        assert sorted(p.name for p in (root / "tokenizer").iterdir()) == ["spiece.model"]
        t5 = json.loads((root / "text_encoder" / "config.json").read_text())
        assert (t5["d_model"], t5["d_ff"], t5["d_kv"], t5["num_heads"], t5["feed_forward_proj"], t5["dropout_rate"],
                t5["vocab_size"], t5["num_layers"]) == (4096, 10240, 64, 64, "gated-gelu", 0.1, 32128, 1)
        assert (root / "text_encoder" / "model.safetensors.index.json").is_file()
        vae = json.loads((root / "vae" / "config.json").read_text())
        assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
        sch = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        assert sch["_class_name"] == "DPMSolverMultistepScheduler"
        assert (sch["beta_schedule"], sch["beta_start"], sch["beta_end"], sch["num_train_timesteps"],
                sch["prediction_type"], sch["algorithm_type"], sch["solver_order"]) == \
            ("linear", 0.0001, 0.02, 1000, "epsilon", "dpmsolver++", 2)


def _recipe(base: Path, tmp: Path):
    from medsynth.recipe import load_recipe

    return load_recipe("demo", [f"model.base={base}", f"workdir={tmp}", "model.dtype=fp32", "model.device=cpu"])


@pytest.fixture(scope="module")
def loaded(bases, tmp_path_factory):
    """The 1024-MS base loaded by medsynth's loader (fp32), plus the 512 transformer."""
    from diffusers import PixArtTransformer2DModel

    from medsynth.models import loading

    tmp = tmp_path_factory.mktemp("rs")
    comps = loading.load_components(_recipe(bases["1024-MS"], tmp), parts=("transformer", "text_encoder", "tokenizer"))
    tr512 = PixArtTransformer2DModel.from_pretrained(str(bases["512"]), subfolder="transformer")
    return comps, tr512, tmp


def test_loader_builds_every_part_from_the_real_layout(loaded):
    comps, tr512, _ = loaded
    # bf16 safetensors on disk, loaded in model.dtype (fp32).
    assert next(comps.text_encoder.parameters()).dtype == torch.float32
    assert comps.text_encoder.config.dropout_rate == 0.1
    # T5 tokenizer built from spiece.model alone (model_index.json names T5Tokenizer); lower-case text,
    # EOS = 1, pad = 0 as T5's.
    ids = comps.tokenizer(["a red polyp"], padding="max_length", max_length=8).input_ids[0]
    assert 1 in ids and ids[-1] == 0 and comps.tokenizer.unk_token_id not in ids[:ids.index(1)]
    # The micro-condition flag: a module attribute derived from sample_size; the config says None.
    assert comps.transformer.config.use_additional_conditions is None
    assert comps.transformer.use_additional_conditions is True and tr512.use_additional_conditions is False


def test_predict_noise_passes_micro_conditions_on_1024ms(loaded):
    from medsynth import sampling

    comps, tr512, _ = loaded
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 4096, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        a = pixart.predict_noise(comps.transformer, x, torch.tensor([500]), ctx, mask, (64, 64))
        b = pixart.predict_noise(comps.transformer, x, torch.tensor([500]), ctx, mask, (64, 96))
        c = pixart.predict_noise(tr512, x, torch.tensor([500]), ctx, mask)
    assert a.shape == b.shape == c.shape == (2, 4, 8, 8)
    assert (a - b).abs().max() > 1e-6  # resolution / aspect ratio reach the DiT
    assert pixart.uses_micro_conditions(comps.transformer) and not pixart.uses_micro_conditions(tr512)


@pytest.mark.parametrize("base_dropout", [False, True])
def test_base_dropout_on_real_t5_with_lora(loaded, base_dropout):
    """T5 v1.1's dropout_rate 0.1: off by default while training LoRA, on with finetune.base_dropout."""
    from medsynth.finetune import lora
    from medsynth.recipe import LoraConfig

    comps, _, _ = loaded
    te = comps.text_encoder
    if not any("lora_" in n for n, _ in te.named_parameters()):
        lora.add_lora(te, LoraConfig(rank=4, alpha=4.0, dropout=0.0), pixart.T5_TARGETS["full"], "T5")
    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora.set_train_mode(te, base_dropout)
    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    with torch.no_grad():
        a, b = te(ids)[0], te(ids)[0]
    assert torch.equal(a, b) != base_dropout
    # Either way the T5 blocks stay in training mode: transformers checkpoints a layer only then.
    blocks = [m for m in te.modules() if type(m).__name__ == "T5Block"]
    assert blocks and all(m.training for m in blocks)
    loss = te(ids)[0].square().mean()
    loss.backward()  # through the checkpointed blocks to the LoRA weights (B: A gets none while B = 0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in te.named_parameters() if "lora_B" in n)
    te.zero_grad(set_to_none=True)
    te.eval()
