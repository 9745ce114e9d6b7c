"""PixArt-Σ through the pixart family: a Σ-layout base (the tiny base with model_index.json naming
``PixArtSigmaPipeline``; Σ's DiT, like the tiny one, has no micro-conditions) is detected as pixart,
gets the stock ``PixArtSigmaPipeline``, samples as that pipeline does, takes ``load_finetuned``, and
warns when run with fewer than Σ's 300 T5 tokens.

One workspace (2 HyperKvasir classes, 32 px tiny base), the Σ copy next to it and a 2-step LoRA
finetune (DiT + T5) on the copy, shared by the module.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from _helpers import prepare_manifest_workspace
from test_load_finetuned import FT_SETS, _Compare
from test_synthesize import CLASSES, PER_IMAGES, _recipe_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["An Endoscopic image of a Red polyp", "An endoscopic image of IMPACTED stool with blurred borders"]
SEEDS = [21, 22]


@pytest.fixture(scope="module")
def sig(tmp_path_factory):
    """The prepared workspace, the tiny (α) recipe, the Σ copy of its base, the Σ recipe and its finetune."""
    from medsynth import finetune
    from medsynth.models import pixart
    from medsynth.recipe import load_recipe

    sets = [s for s in FT_SETS if not s.startswith("finetune.max_steps=")] + ["finetune.max_steps=2"]
    prep = prepare_manifest_workspace(tmp_path_factory.mktemp("sigma"), _recipe_text, CLASSES, PER_IMAGES, sets=sets)
    tmp, r_alpha = prep["tmp"], prep["recipe"]
    tiny = pixart.BACKBONE.build_tiny(r_alpha)
    base = tmp / "sigma-base"
    shutil.copytree(tiny, base)
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    index["_class_name"] = "PixArtSigmaPipeline"
    (base / "model_index.json").write_text(json.dumps(index))
    r = load_recipe(prep["recipe_path"], sets + [f"model.base={base}"])
    finetune.run(r)
    return {"tmp": tmp, "alpha": r_alpha, "recipe": r, "base": base, "workdir": r.workdir_path}


@pytest.fixture(scope="module")
def comps(sig):
    from medsynth.models import loading

    return loading.load_components(sig["recipe"], device="cpu", dtype="fp32")


def test_sigma_base_is_pixart_with_the_sigma_stock_pipeline(sig, comps):
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    from medsynth.models import loading
    from medsynth.models.backbone import family_of
    from medsynth.models.pixart import BACKBONE

    assert family_of(sig["recipe"]) == "pixart"
    assert comps.transformer.use_additional_conditions is False  # as Σ's DiT
    assert type(BACKBONE.stock_pipeline(comps)) is PixArtSigmaPipeline
    alpha = loading.load_components(sig["alpha"], device="cpu", dtype="fp32")
    assert type(BACKBONE.stock_pipeline(alpha)) is PixArtAlphaPipeline


@pytest.mark.parametrize("negative", ["", "Blurry, low Quality"])
def test_generate_matches_pixart_sigma_pipeline(sig, comps, negative):
    """Same seeded noise, prompts, negative prompt, guidance, steps and token limit (fp32, CPU)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from medsynth import sampling
    from medsynth.models.pixart import BACKBONE

    c, res, steps, guidance = comps, 32, 4, 4.5
    max_len = sig["recipe"].model.max_text_tokens
    ours = sampling.generate(BACKBONE, c, PROMPTS, SEEDS, resolution=res, steps=steps, guidance=guidance,
                             max_length=max_len, negative_prompt=negative, batch_size=2, device="cpu",
                             dtype=torch.float32)
    pipe = PixArtSigmaPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, transformer=c.transformer,
                               scheduler=DPMSolverMultistepScheduler.from_config(c.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    f = 2 ** (len(c.vae.config.block_out_channels) - 1)
    latents = sampling.seeded_noise(SEEDS, (c.transformer.config.in_channels, res // f, res // f), "cpu")
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                      height=res, width=res, latents=latents, max_sequence_length=max_len,
                      use_resolution_binning=False, clean_caption=False, output_type="pt").images * 2 - 1
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    print(f"max |generate - PixArtSigmaPipeline| = {diff:.3g}")
    assert diff <= 1e-4, diff
    assert ((ours.abs() < 0.99).float().mean() > 0.05).item()  # not two saturated images
    assert (ours[0] - ours[1]).abs().max() > 1e-3


class _SigmaCompare(_Compare):
    def stock_pipe(self):
        from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

        from medsynth.models.loading import resolve_base

        pipe = PixArtSigmaPipeline.from_pretrained(resolve_base(self.r), torch_dtype=torch.float32)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
        pipe.set_progress_bar_config(disable=True)
        return pipe


def test_load_finetuned_on_stock_sigma_pipeline_equals_synthesis(sig):
    import medsynth

    c = _SigmaCompare(sig)
    ours = c.ours(sig["workdir"] / "finetune" / "final")
    assert type(c.engine.pipe).__name__ == "PixArtSigmaPipeline"  # synthesis samples through Σ's pipeline too
    pipe = c.stock_pipe()
    before = c.stock(pipe)
    assert medsynth.load_finetuned(pipe, sig["workdir"] / "finetune") is pipe
    got = c.stock(pipe)
    assert np.abs(before - ours).max() > 1e-2  # the adapters change the images: the comparison means something
    assert np.abs(got - ours).max() <= 1e-4


def test_sigma_below_300_tokens_warns_once_at_load_naming_the_fix(sig, comps, monkeypatch, capsys):
    """The warning comes where parts are loaded with the recipe at hand (components and the caption
    stage's tokenizer), once per base; encoding (every training step) checks nothing."""
    from medsynth.models import loading, pixart

    monkeypatch.setattr(pixart, "_warned_bases", set(), raising=False)
    r16 = _with_tokens(sig["recipe"], 16)
    loading.load_components(r16, parts=("tokenizer",), device="cpu", dtype="fp32")
    err = capsys.readouterr().err
    assert "PixArt-Σ" in err and "model.max_text_tokens is 16" in err
    assert "--set model.max_text_tokens=300" in err
    loading.load_tokenizer(r16)
    assert "max_text_tokens" not in capsys.readouterr().err  # once per base

    monkeypatch.setattr(pixart, "_warned_bases", set(), raising=False)
    loading.load_tokenizer(r16)  # the caption stage's load warns too
    assert "model.max_text_tokens is 16" in capsys.readouterr().err

    monkeypatch.setattr(pixart, "_warned_bases", set(), raising=False)
    pixart.BACKBONE.encode(comps, PROMPTS, 16, "cpu")
    assert "max_text_tokens" not in capsys.readouterr().err  # not per step
    loading.load_components(_with_tokens(sig["recipe"], 300), parts=("tokenizer",), device="cpu", dtype="fp32")
    assert "max_text_tokens" not in capsys.readouterr().err  # Σ's own 300: nothing to say
    # An α base with the same limit: no warning.
    loading.load_components(_with_tokens(sig["alpha"], 16), parts=("tokenizer", "text_encoder"), device="cpu",
                            dtype="fp32")
    assert "max_text_tokens" not in capsys.readouterr().err


def _with_tokens(recipe, n: int):
    import copy

    r = copy.deepcopy(recipe)
    r.model.max_text_tokens = n
    return r
