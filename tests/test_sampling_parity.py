"""medsynth's sampler (sampling.generate) against diffusers' PixArtAlphaPipeline on the same components.

Same seeded noise, prompts, negative prompt, guidance, steps and token limit; the pipeline without
resolution binning or caption cleaning. Both lower-case prompts (the pipeline in
``_text_preprocessing``), so mixed-case prompts are used on purpose. fp32 on the CPU: the two
agree to ~1e-7; the bound is 1e-4.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import real_shaped
from conftest import SHARED_DATA
from medsynth import sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["An Endoscopic image of a Red polyp", "A dermoscopic image of a BROWN nevus with blurred borders"]
SEEDS = [11, 12]


def _both(c, *, res: int, steps: int, guidance: float, max_len: int, negative: str):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from medsynth.models.pixart import BACKBONE

    ours = sampling.generate(BACKBONE, c, PROMPTS, SEEDS,
                             resolution=res, steps=steps, guidance=guidance, max_length=max_len,
                             negative_prompt=negative, batch_size=2, device="cpu", dtype=torch.float32)
    pipe = PixArtAlphaPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
                               transformer=c.transformer,
                               scheduler=DPMSolverMultistepScheduler.from_config(c.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    f = 2 ** (len(c.vae.config.block_out_channels) - 1)
    # prepare_latents multiplies given latents by init_noise_sigma, as generate() does.
    latents = sampling.seeded_noise(SEEDS, (c.transformer.config.in_channels, res // f, res // f), "cpu")
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                      height=res, width=res, latents=latents, max_sequence_length=max_len,
                      use_resolution_binning=False, clean_caption=False, output_type="pt").images
    return ours, theirs * 2 - 1  # "pt" output is in [0, 1], clamped like ours


def _check(ours, theirs):
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - PixArtAlphaPipeline| = {diff:.3g}")
    assert diff <= 1e-4, diff
    # Not a comparison of two saturated images: part of each image lies strictly inside (-1, 1).
    assert ((ours.abs() < 0.99).float().mean() > 0.05).item()
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # prompts and seeds make different images
    return diff


# ----------------------------------------------------------------------------- tiny base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """medsynth's own tiny base (model.base: tiny, v-prediction), built on a 2-class workspace."""
    from medsynth import data
    from medsynth.models import loading
    from medsynth.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("parity")
    manifest = tmp / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for c in ("polyps", "normal-cecum"):
            for p in sorted((SHARED_DATA / "hyperkvasir" / c).iterdir())[:3]:
                w.writerow([str(p), c])
    r = load_recipe("demo", [f"workdir={tmp / 'ws'}", f"data.manifest={manifest}", "data.root=null",
                             "model.resolution=32", "model.tiny.vae_fit_steps=2", "model.tiny.vae_fit_batch=2",
                             "model.tiny.layers=2", "model.tiny.heads=2", "model.tiny.head_dim=8",
                             "model.tiny.text_layers=1", "model.tiny.text_dim=32", "model.tiny.vae_channels=[16,32]",
                             "model.tiny.vocab_size=200", "model.max_text_tokens=16"])
    data.run(r)
    return loading.load_components(r, device="cpu", dtype="fp32")


@pytest.mark.parametrize("negative", ["", "Blurry, low Quality"])
def test_generate_matches_pixart_pipeline_on_tiny_base(tiny, negative):
    assert tiny.scheduler.config.prediction_type == "v_prediction"
    _check(*_both(tiny, res=32, steps=4, guidance=4.5, max_len=16, negative=negative))


# ----------------------------------------------------------------------------- real-shaped bases


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real-shaped 512 base loaded by medsynth's loader, and the 1024-MS DiT (same T5 / VAE)."""
    from diffusers import PixArtTransformer2DModel

    from medsynth.models import loading
    from medsynth.recipe import load_recipe

    roots = {k: real_shaped.ensure(k) for k in real_shaped.KINDS}
    r = load_recipe("demo", [f"model.base={roots['512']}", f"workdir={tmp_path_factory.mktemp('parity-real')}",
                             "model.dtype=fp32", "model.device=cpu"])
    comps = loading.load_components(r)
    tr1024 = PixArtTransformer2DModel.from_pretrained(str(roots["1024-MS"]), subfolder="transformer").eval()
    return comps, tr1024


@pytest.mark.parametrize("kind", ["512", "1024-MS"])
def test_generate_matches_pixart_pipeline_on_real_shaped_base(real, kind):
    comps, tr1024 = real
    c = comps if kind == "512" else comps.replace(transformer=tr1024)
    # 1024-MS: the pipeline adds resolution / aspect-ratio conditions (sample_size 128); generate() must too.
    assert c.transformer.use_additional_conditions == (kind == "1024-MS")
    _check(*_both(c, res=64, steps=3, guidance=4.5, max_len=16, negative="Blurry"))
