"""Finetune output -> inference: `medsynth.load_finetuned` on a stock pipeline, fp32 LoRA merge, mismatch checks.

One workspace (2 HyperKvasir classes, 32 px tiny base) fine-tuned for a few LoRA steps (DiT + T5)
in-process, shared by the module.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from medsynth.models import pixart

from _helpers import prepare_manifest_workspace
from test_synthesize import CLASSES, PER_IMAGES, _recipe_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FT_SETS = ["finetune.adapter=lora", "finetune.max_steps=3", "finetune.batch_size=2", "finetune.learning_rate=0.02",
           "finetune.mixed_precision='no'", "finetune.gradient_checkpointing=false", "finetune.hldf.enabled=false",
           "finetune.checkpoint_every=1000", "finetune.sample_every=1000", "finetune.log_every=1",
           "finetune.lora.rank=4", "finetune.lora.alpha=4"]


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """(recipe path, loaded recipe, workdir) with the workspace prepared and a 3-step LoRA finetune done."""
    from medsynth import finetune

    prep = prepare_manifest_workspace(tmp_path_factory.mktemp("loadft"), _recipe_text, CLASSES, PER_IMAGES,
                                      sets=FT_SETS)
    tmp, recipe_path, r = prep["tmp"], prep["recipe_path"], prep["recipe"]
    finetune.run(r)
    return {"recipe_path": recipe_path, "recipe": r, "workdir": r.workdir_path, "tmp": tmp}


def _latents(engine, samples):
    # What the synthesis engine draws: one CPU generator per sample, seeded with the sample's seed.
    return torch.stack([torch.randn(engine.latent_shape, generator=torch.Generator("cpu").manual_seed(s.seed))
                        for s in samples])


def test_final_holds_peft_folders_and_no_unloadable_single_file(ft):
    final = ft["workdir"] / "finetune" / "final"
    assert (final / "transformer" / "adapter_config.json").is_file()
    assert (final / "text_encoder" / "adapter_config.json").is_file()
    # diffusers has no LoRA loader for PixArt; a "diffusers-style" file would load nowhere.
    assert not (final / "pytorch_lora_weights.safetensors").exists()
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    assert not hasattr(PixArtAlphaPipeline, "load_lora_weights")
    assert not hasattr(PixArtTransformer2DModel, "load_lora_adapter")
    info = json.loads((final / "adapter.json").read_text())
    assert info["kind"] == "lora" and info["resolution"] == 32


class _Compare:
    """medsynth's synthesis path and a user's stock pipeline, on the same samples, prompts and noise."""

    def __init__(self, ft):
        from medsynth.data import read_classes
        from medsynth.synthesize import make_plan
        from medsynth.synthesize.prompts import build_prompts

        self.r = r = ft["recipe"]
        plan = make_plan(r, read_classes(ft["workdir"]), 2)
        self.samples = [plan.shard(i)[j] for i in range(plan.n_shards) for j in range(len(plan.shard(i)))]
        self.prompts, _ = build_prompts(r, plan, ft["workdir"])

    def ours(self, final):
        from medsynth.synthesize import load_model
        from medsynth.synthesize.engine import Engine

        s, m = self.r.synthesize, self.r.model
        comps = load_model(self.r, final, "cpu", torch.float32)
        self.engine = Engine(comps, resolution=m.resolution, steps=s.steps, guidance=s.guidance,
                             negative_prompt=s.negative_prompt, max_text_tokens=m.max_text_tokens, device="cpu",
                             dtype=torch.float32)
        return self.engine.generate_float(self.samples, self.prompts)

    def stock_pipe(self):
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
        from medsynth.models.loading import resolve_base

        pipe = PixArtAlphaPipeline.from_pretrained(resolve_base(self.r), torch_dtype=torch.float32)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def stock(self, pipe):
        s, m = self.r.synthesize, self.r.model
        return pipe(prompt=[self.prompts[x.key] for x in self.samples], negative_prompt=s.negative_prompt,
                    latents=_latents(self.engine, self.samples), num_inference_steps=s.steps, guidance_scale=s.guidance,
                    height=m.resolution, width=m.resolution, use_resolution_binning=False, clean_caption=False,
                    max_sequence_length=m.max_text_tokens, output_type="np").images


def test_load_finetuned_on_stock_pipeline_equals_synthesis(ft):
    import medsynth

    c = _Compare(ft)
    ours = c.ours(ft["workdir"] / "finetune" / "final")
    pipes = {merge: c.stock_pipe() for merge in (True, False)}
    before = c.stock(pipes[True])
    transformer = pipes[True].transformer
    assert medsynth.load_finetuned(pipes[True], ft["workdir"] / "finetune") is pipes[True]
    assert pipes[True].transformer is transformer  # in place
    assert not any("lora_" in n for n, _ in pipes[True].transformer.named_parameters())
    merged = c.stock(pipes[True])
    medsynth.load_finetuned(pipes[False], ft["workdir"] / "finetune" / "final", merge=False)
    assert any("lora_" in n for n, _ in pipes[False].transformer.named_parameters())
    unmerged = c.stock(pipes[False])

    assert np.abs(before - ours).max() > 1e-2  # the adapters change the images: the comparison means something
    assert np.abs(merged - ours).max() <= 1e-4
    assert np.abs(unmerged - ours).max() <= 1e-4


def test_load_finetuned_full_dit_equals_synthesis(ft, tmp_path):
    """adapter.json kind=full: the fine-tuned DiT replaces the pipeline's; the T5 LoRA still applies."""
    import shutil

    import medsynth
    from medsynth.models.loading import load_components

    final = tmp_path / "final"
    tr = load_components(ft["recipe"], parts=("transformer",), device="cpu", dtype=torch.float32).transformer
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in tr.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tr.save_pretrained(final / "transformer")
    shutil.copytree(ft["workdir"] / "finetune" / "final" / "text_encoder", final / "text_encoder")
    info = json.loads((ft["workdir"] / "finetune" / "final" / "adapter.json").read_text())
    (final / "adapter.json").write_text(json.dumps({**info, "kind": "full"}))

    c = _Compare(ft)
    ours = c.ours(final)
    pipe = c.stock_pipe()
    before = c.stock(pipe)
    medsynth.load_finetuned(pipe, final)
    assert torch.equal(pipe.transformer.pos_embed.proj.weight, tr.pos_embed.proj.weight)
    got = c.stock(pipe)
    assert np.abs(before - ours).max() > 1e-2
    assert np.abs(got - ours).max() <= 1e-4


def test_load_finetuned_names_a_missing_component(ft):
    import medsynth
    from diffusers import PixArtAlphaPipeline
    from medsynth.errors import UserError
    from medsynth.models.loading import resolve_base

    pipe = PixArtAlphaPipeline.from_pretrained(resolve_base(ft["recipe"]), text_encoder=None, torch_dtype=torch.float32)
    with pytest.raises(UserError, match="no text_encoder"):
        medsynth.load_finetuned(pipe, ft["workdir"] / "finetune")
    with pytest.raises(UserError, match="adapter.json"):
        medsynth.load_finetuned(pipe, ft["tmp"])


def _small_update_adapter(r, out):
    """A LoRA on the DiT and T5 whose update is ~1e-3 of each weight: below bf16's half spacing (2^-9) for most."""
    from medsynth.finetune import adapters, lora
    from medsynth.models.loading import load_components, resolve_base

    torch.manual_seed(0)
    comps = load_components(r, parts=("transformer", "text_encoder"), device="cpu", dtype=torch.float32)
    lc = r.finetune.lora
    cfgs = {"transformer": lora.add_lora(comps.transformer, lc, pixart.DIT_TARGETS["paper"], "dit"),
            "text_encoder": lora.add_lora(comps.text_encoder, lc, pixart.T5_TARGETS["full"], "t5")}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (comps.transformer, comps.text_encoder):
            for layer in model.modules():
                if hasattr(layer, "lora_B") and "default" in layer.lora_B:
                    layer.lora_B["default"].weight.normal_(0, 1, generator=g)
                    w = layer.get_base_layer().weight
                    d = layer.get_delta_weight("default")
                    layer.lora_B["default"].weight.mul_(1e-3 * w.abs().mean() / d.abs().mean())
    for part, cfg in cfgs.items():
        adapters.save_peft_dir(getattr(comps, part), cfg, out / part, resolve_base(r), part)
    (out / "adapter.json").write_text(json.dumps({"kind": "lora", "base": resolve_base(r), "resolution": r.model.resolution}))


def test_synthesis_merges_lora_in_fp32_before_casting_to_bf16(ft, tmp_path):
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from medsynth.models.loading import load_components
    from medsynth.synthesize import load_model

    from medsynth.models import loading

    r = ft["recipe"]
    _small_update_adapter(r, tmp_path)
    loads, real_load = [], loading.load_components

    def spy(*a, **kw):
        loads.append(kw.get("dtype"))
        return real_load(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "load_components", spy)
        got = load_model(r, tmp_path, "cpu", torch.bfloat16)
    assert loads == [torch.bfloat16]  # no second, float32 load of a whole part: the files are read per layer

    # The reference: fp32 base weights W plus peft's own fp32 delta, exact sum; want = one rounding to bf16.
    ref = load_components(r, parts=("transformer", "text_encoder"), device="cpu", dtype=torch.float32)
    # Today's path before the fix: load the base in bf16, let peft merge into the bf16 weights.
    old = load_components(r, parts=("transformer", "text_encoder"), device="cpu", dtype=torch.bfloat16)
    n_layers, err_new, err_old, kept_new, kept_old, n = 0, 0.0, 0.0, 0, 0, 0
    for part in ("transformer", "text_encoder"):
        model = getattr(ref, part)
        PeftModel.from_pretrained(model, str(tmp_path / part))
        old_merged = dict(PeftModel.from_pretrained(getattr(old, part), str(tmp_path / part))
                          .merge_and_unload().named_parameters())
        new = dict(getattr(got, part).named_parameters())
        assert not any("lora_" in k for k in new)
        for name, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer) or not hasattr(layer, "base_layer"):
                continue
            with torch.no_grad():
                w = layer.get_base_layer().weight
                exact = w + layer.get_delta_weight("default")
            want = exact.to(torch.bfloat16)
            have = new[f"{name}.weight"]
            assert have.dtype == torch.bfloat16
            assert torch.equal(have, want), name
            err_new += (have.float() - exact).abs().sum().item()
            err_old += (old_merged[f"{name}.weight"].float() - exact).abs().sum().item()
            # How many weights moved off the plain bf16 rounding of the base at all.
            base16 = w.to(torch.bfloat16)
            kept_new += (have != base16).sum().item()
            kept_old += (old_merged[f"{name}.weight"] != base16).sum().item()
            n += w.numel()
            n_layers += 1
    assert n_layers > 20
    # Measured: total |error| 4.13 (new) vs 4.68 (old); weights moved by the update 7906 vs 5535 of 27392.
    assert err_new < err_old, (err_new, err_old)
    assert kept_new > 1.2 * kept_old, (kept_new, kept_old)


def test_load_finetuned_on_a_bf16_stock_pipeline_merges_against_the_stored_weights(ft, tmp_path):
    """A user's pipeline built in bf16: load_finetuned reads each LoRA layer's weight from the files of the
    pipeline's own base (name_or_path), so the result is the stored weight plus the delta, rounded once."""
    from diffusers import PixArtAlphaPipeline
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    import medsynth
    from medsynth.models.loading import load_components, resolve_base

    r = ft["recipe"]
    _small_update_adapter(r, tmp_path)
    pipe = PixArtAlphaPipeline.from_pretrained(resolve_base(r), torch_dtype=torch.bfloat16)
    assert pipe.name_or_path == resolve_base(r)
    medsynth.load_finetuned(pipe, tmp_path)
    ref = load_components(r, parts=("transformer",), device="cpu", dtype=torch.float32).transformer
    ref = PeftModel.from_pretrained(ref, str(tmp_path / "transformer"))
    have = dict(pipe.transformer.named_parameters())
    n, rounded_twice = 0, 0
    for name, layer in ref.base_model.model.named_modules():
        if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer"):
            with torch.no_grad():
                w = layer.get_base_layer().weight
                want = (w + layer.get_delta_weight("default")).to(torch.bfloat16)
                twice = (w.to(torch.bfloat16).float() + layer.get_delta_weight("default")).to(torch.bfloat16)
            assert torch.equal(have[f"{name}.weight"], want), name
            rounded_twice += (twice != want).sum().item()
            n += 1
    assert n > 20
    assert rounded_twice > 0  # merging into the bf16-loaded weights would have given other values


def test_bf16_merge_on_a_real_shaped_base_reads_every_layer_from_its_files(tmp_path, capsys):
    """On the real-shaped PixArt-alpha 512 base (hub layout: the legacy Transformer2DModel checkpoint,
    T5-XXL width in bf16 shards), every LoRA layer's weight is found in the files under its module
    name, and the bf16 result is the stored weight plus the delta, rounded once."""
    import real_shaped
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from medsynth.finetune import adapters, lora
    from medsynth.models.loading import stored_weights
    from medsynth.recipe import load_recipe

    base = real_shaped.ensure("512")
    r = load_recipe("demo", [f"model.base={base}", f"workdir={tmp_path / 'ws'}", "finetune.lora.rank=2"])
    bb = pixart.BACKBONE
    t32 = bb.load_part("transformer", str(base), {"subfolder": "transformer"}, torch.float32)
    cfg = lora.add_lora(t32, r.finetune.lora, pixart.DIT_TARGETS["paper"], "dit")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in t32.modules():
            if hasattr(layer, "lora_B") and "default" in layer.lora_B:
                layer.lora_B["default"].weight.normal_(0, 1e-3, generator=g)
    out = tmp_path / "ft" / "final"
    adapters.save_peft_dir(t32, cfg, out / "transformer", str(base), "transformer")
    (out / "adapter.json").write_text(json.dumps({"kind": "lora", "base": str(base), "resolution": 512}))
    del t32

    stored = stored_weights(str(base), "transformer")
    assert stored is not None and len(stored) > 0
    comps = type("C", (), {})()
    comps.transformer = bb.load_part("transformer", str(base), {"subfolder": "transformer"}, torch.bfloat16)
    adapters.apply_finetuned(comps, out, base=str(base), parts=("transformer",))
    assert "were merged into their" not in capsys.readouterr().err  # no layer missed in the files

    ref = PeftModel.from_pretrained(bb.load_part("transformer", str(base), {"subfolder": "transformer"},
                                                 torch.float32), str(out / "transformer"))
    have = dict(comps.transformer.named_parameters())
    n = 0
    for name, layer in ref.base_model.model.named_modules():
        if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer"):
            with torch.no_grad():
                want = (layer.get_base_layer().weight + layer.get_delta_weight("default")).to(torch.bfloat16)
            assert torch.equal(have[f"{name}.weight"], want), name
            n += 1
    assert n > 20


def test_fp16_merge_keeps_the_dtypes_from_pretrained_chose(ft, tmp_path):
    """transformers keeps T5's `wo` in fp32 under fp16 (overflow); merging must not cast it down."""
    from peft import PeftModel

    from medsynth.models.loading import load_components
    from medsynth.synthesize import load_model

    r = ft["recipe"]
    _small_update_adapter(r, tmp_path)
    plain = load_components(r, parts=("text_encoder",), device="cpu", dtype=torch.float16).text_encoder
    got = load_model(r, tmp_path, "cpu", torch.float16).text_encoder
    assert {n: p.dtype for n, p in got.named_parameters()} == {n: p.dtype for n, p in plain.named_parameters()}
    wo = [n for n, p in got.named_parameters() if n.endswith("wo.weight")]
    assert wo and all(dict(got.named_parameters())[n].dtype == torch.float32 for n in wo)
    ref = load_components(r, parts=("text_encoder",), device="cpu", dtype=torch.float32).text_encoder
    ref = PeftModel.from_pretrained(ref, str(tmp_path / "text_encoder")).merge_and_unload()
    for n in wo:
        assert torch.equal(dict(got.named_parameters())[n], dict(ref.named_parameters())[n])


# ----------------------------------------------------------------------------- adapter / recipe mismatch


def test_resolution_mismatch_fails_before_work_via_cli(ft, cli, tmp_path):
    out = tmp_path / "out"
    tiny_bases = sorted((ft["workdir"] / "tiny-base").iterdir())
    p = cli("synthesize", str(ft["recipe_path"]), "--per-class", "1", "--out", str(out),
            "--set", "model.resolution=64", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 1, p.stderr
    msg = " ".join(p.stderr.split())
    assert "Traceback" not in p.stderr
    assert os.path.join("finetune", "final", "adapter.json") in msg
    assert "model.resolution 32" in msg and "asks for 64" in msg
    assert "medsynth finetune" in msg and "--set model.resolution=32" in msg
    assert not out.exists()
    # 'tiny' at 64 px is another tiny base: the base is named too, with what to set back.
    assert "model.tiny, model.resolution and seed" in msg
    assert sorted((ft["workdir"] / "tiny-base").iterdir()) == tiny_bases  # no 64 px base was built first


def test_base_mismatch_fails_via_cli_and_same_dir_given_differently_passes(ft, cli, tmp_path):
    from medsynth.models.loading import resolve_base
    from medsynth.recipe import load_recipe
    from medsynth.synthesize import check_adapter_matches

    final = ft["workdir"] / "finetune" / "final"
    other = tmp_path / "other-base"
    other.mkdir()
    p = cli("synthesize", str(ft["recipe_path"]), "--per-class", "1", "--out", str(tmp_path / "out"),
            "--set", f"model.base={other}", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 1, p.stderr
    msg = " ".join(p.stderr.split())
    assert "Traceback" not in p.stderr
    trained = resolve_base(ft["recipe"])
    assert str(final / "adapter.json") in msg
    assert f"trained on model.base '{trained}'" in msg and f"model.base is '{other}'" in msg
    assert "medsynth finetune" in msg and f"--set model.base={trained}" in msg

    # The same local directory given differently (a symlink, a path with '..'): not a mismatch.
    link = tmp_path / "link"
    link.symlink_to(trained, target_is_directory=True)
    for given in (str(link), f"{trained}/../{os.path.basename(trained)}"):
        check_adapter_matches(load_recipe(ft["recipe_path"], FT_SETS + [f"model.base={given}"]), final)
    # A tiny base reached through a moved/other workspace path: identified by its key directory.
    info = json.loads((final / "adapter.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter.json").write_text(json.dumps({**info, "base": f"/elsewhere/ws/tiny-base/{os.path.basename(trained)}"}))
    check_adapter_matches(ft["recipe"], moved)
