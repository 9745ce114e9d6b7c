"""The model-loading layer and the tiny offline PixArt-layout base, on real images, CPU, offline.

One small workspace (3 classes x 4 real dermoscopy images) is prepared and its tiny base built
once per module with a 3-step VAE fit; everything is then loaded back through from_pretrained.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medsynth import data
from medsynth.errors import UserError
from medsynth.models import loading, tiny
from medsynth.recipe import load_recipe

from _helpers import link_subset, shared_data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("melanoma", "dermatofibroma", "vascular-lesion")
# The fitted-VAE tiny base is what these tests are about (the demo recipe itself uses TAEF2).
FAST = ["model.tiny.autoencoder=fitted", "model.tiny.vae_fit_steps=3", "model.tiny.vae_fit_batch=4"]


def _recipe(data_root: Path, workdir: Path, *extra: str):
    return load_recipe("demo", [f"data.root={data_root}", f"workdir={workdir}", *FAST, *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # Links to 4 real images per class (the images stay in ../shared/data).
    data_root = link_subset(shared_data_dir() / "ham10000", root / "images", CLASSES, per_class=4)
    r = _recipe(data_root, root / "ws")
    data.run(r)
    base = Path(loading.resolve_base(r))
    return r, base


@pytest.fixture(scope="module")
def comps(built):
    r, _ = built
    return loading.load_components(r, device="cpu", dtype="fp32")


def test_layout_and_architecture(built, comps):
    r, base = built
    for name in ("model_index.json", "transformer/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert (base / name).is_file(), name
    assert base.parent == r.workdir_path.resolve() / "tiny-base"
    assert loading.missing_parts(base) == []
    assert comps.base == str(base)

    tc = comps.transformer.config
    lat = r.model.tiny.latent_channels
    assert type(comps.transformer).__name__ == "PixArtTransformer2DModel"
    assert (tc.norm_type, tc.patch_size, tc.use_additional_conditions) == ("ada_norm_single", 2, False)
    assert tc.in_channels == lat and tc.out_channels == 2 * lat  # learned sigma
    assert tc.caption_channels == comps.text_encoder.config.d_model
    factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    assert factor == 4 and tc.sample_size == r.model.resolution // factor

    te = comps.text_encoder
    assert type(te).__name__ == "T5EncoderModel" and te.config.feed_forward_proj == "gated-gelu"
    names = {n.rsplit(".", 1)[-1] for n, _ in te.named_modules()}
    assert {"q", "k", "v", "o", "wi_0", "wi_1", "wo"} <= names  # the LoRA targets of T5 v1.1
    assert te.config.vocab_size == len(comps.tokenizer)

    sc = comps.scheduler.config
    assert type(comps.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (sc.algorithm_type, sc.beta_schedule, sc.num_train_timesteps, sc.solver_order) == ("dpmsolver++", "linear", 1000, 2)
    assert sc.prediction_type == r.model.tiny.prediction_type == "v_prediction"


def test_transformer_starts_as_pixart_trains_from_scratch(comps):
    # Text pathway and output start at zero (PixArt-alpha's init), the rest is random;
    # comps holds the weights exactly as the build saved them.
    fresh = comps.transformer
    for block in fresh.transformer_blocks:
        assert not block.attn2.to_out[0].weight.any() and not block.attn2.to_out[0].bias.any()
        assert block.attn1.to_q.weight.std() > 0
    assert not fresh.proj_out.weight.any()
    w = fresh.caption_projection.linear_1.weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.005


def test_one_denoising_step(built, comps):
    r, _ = built
    embeds, mask = loading.encode_prompts(comps.tokenizer, comps.text_encoder,
                                          ["A dermoscopic image of melanoma", ""], r.model.max_text_tokens, "cpu")
    assert embeds.shape == (2, r.model.max_text_tokens, comps.text_encoder.config.d_model)
    assert mask.shape == (2, r.model.max_text_tokens) and mask[1].sum() == 1  # "" is just </s>
    side = comps.transformer.config.sample_size
    lat = r.model.tiny.latent_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, lat, side, side, generator=g)
    sched = comps.scheduler
    sched.set_timesteps(2)
    t = sched.timesteps[0]
    with torch.no_grad():
        out = comps.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                timestep=t.expand(2), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape == (2, 2 * lat, side, side) and torch.isfinite(out).all()
    eps, _ = out.chunk(2, dim=1)
    prev = sched.step(eps, t, x).prev_sample
    assert prev.shape == x.shape and torch.isfinite(prev).all()
    assert not torch.allclose(prev, x)


def test_vae_round_trip_and_latent_scale(built, comps):
    r, _ = built
    rows = data.read_manifest(r.workdir_path, "train")
    images = tiny.load_images([row.path for row in rows], r.model.resolution)
    vae = comps.vae
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
        rec = vae.decode(z).sample
    f = r.model.resolution // 4
    assert z.shape == (len(rows), r.model.tiny.latent_channels, f, f)
    assert rec.shape == images.shape and torch.isfinite(rec).all()
    # scaling_factor was measured on exactly these images: scaled latents are centred, unit std.
    scaled = z * vae.config.scaling_factor
    assert abs(float(scaled.std()) - 1.0) < 1e-3
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-3


def test_centring_keeps_reconstruction():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mode()).sample
        z0 = vae.encode(x).latent_dist.mode()
    assert z0.mean(dim=(0, 2, 3)).abs().max() > 1e-3  # a random net's latents are not centred
    stats = tiny._centre_and_scale(vae, x)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        after = vae.decode(z).sample
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert abs(float(z.std()) * vae.config.scaling_factor - 1) < 1e-4
    assert stats["scaling_factor"] == pytest.approx(vae.config.scaling_factor, rel=1e-5)


def test_pixart_pipeline_loads_the_directory(built):
    from diffusers import PixArtAlphaPipeline

    r, base = built
    pipe = PixArtAlphaPipeline.from_pretrained(str(base), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("A dermoscopic image of melanoma", num_inference_steps=2, height=r.model.resolution,
               width=r.model.resolution, use_resolution_binning=False, clean_caption=False,
               max_sequence_length=r.model.max_text_tokens, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, r.model.resolution, r.model.resolution, 3)
    assert (out >= 0).all() and (out <= 1).all() and out.std() > 0
    # encode_prompts gives exactly the pipeline's own prompt embeddings and mask.
    prompts = ["A dermoscopic image of melanoma", "An irregular, dark-brown lesion with a blurred border"]
    ref, ref_mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                             clean_caption=False, max_sequence_length=r.model.max_text_tokens)
    with torch.no_grad():
        emb, mask = loading.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, r.model.max_text_tokens, "cpu")
    torch.testing.assert_close(emb, ref)
    assert torch.equal(mask, ref_mask)


def test_cache_is_reused_without_refit(built, monkeypatch):
    r, base = built
    stamp = (base / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the VAE was fitted again")

    monkeypatch.setattr(tiny, "fit_vae", boom)
    again = _recipe(Path(r.data.root), r.workdir_path)
    assert Path(loading.resolve_base(again)) == base
    assert (base / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in base.parent.iterdir() if p.name.startswith(".tmp")] == []
    # Any input of the key changes the directory (here: the tiny architecture).
    assert tiny.base_dir(_recipe(Path(r.data.root), r.workdir_path, "model.tiny.layers=2")) != base


def test_tokenizer_deterministic_and_needs_no_vae(built, tmp_path, monkeypatch):
    r, base = built

    def boom(*a, **k):
        raise AssertionError("load_tokenizer must not fit the VAE")

    monkeypatch.setattr(tiny, "fit_vae", boom)
    # A second workspace with the same data: its tokenizer is built alone and is byte-identical
    # to the one inside the full base (so captions counted before finetune match training).
    other = _recipe(Path(r.data.root), tmp_path / "ws2")
    data.run(other)
    tok = loading.load_tokenizer(other)
    tok_dir = tiny.tokenizer_dir(other)
    assert (tok_dir / "tokenizer" / "tokenizer.json").read_bytes() == (base / "tokenizer" / "tokenizer.json").read_bytes()
    assert not any(p.name != tok_dir.name for p in (tmp_path / "ws2" / "tiny-base").iterdir())

    n = r.model.max_text_tokens
    assert tok.model_max_length == n
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    texts = ["A dermoscopic image of melanoma with an irregular dark-brown border.",
             "Ünïcödé 漢字 emoji 🙂 tabs\tand\nnewlines {braces} <tags> ~~~", "",
             "word " * 500]
    enc = tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (4, n) and enc.attention_mask.shape == (4, n)
    lengths = enc.attention_mask.sum(1).tolist()
    assert lengths[2] == 1 and lengths[3] == n  # "" -> </s>; the long text is cut at the limit
    for row, k in zip(enc.input_ids, lengths):
        assert row[k - 1] == 1 and (row[k:] == 0).all()  # </s> then padding
    assert int(enc.input_ids.max()) < len(tok)
    ids = tok(texts[0]).input_ids
    assert tok.unk_token_id not in ids  # plain English caption words are all known
    assert tok.decode(ids, skip_special_tokens=True) == texts[0]


def test_check_base_local_dir_missing_transformer(built, tmp_path):
    _, base = built
    broken = tmp_path / "pixart-copy"
    shutil.copytree(base, broken, ignore=shutil.ignore_patterns("transformer"))
    r = load_recipe("demo", [f"model.base={broken}", f"workdir={tmp_path / 'ws'}"])
    with pytest.raises(UserError) as e:
        loading.check_base(r)
    msg = str(e.value)
    assert str(broken) in msg and "transformer/" in msg
    assert "model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/" in msg
    assert "--local-dir" in msg
    # Only the asked-for parts are required (e.g. a stage needing just the tokenizer).
    loading.check_base(r, parts=("tokenizer", "scheduler"))
    with pytest.raises(UserError, match="transformer/"):
        loading.load_components(r, parts=("transformer",), device="cpu", dtype="fp32")
    r2 = load_recipe("demo", [f"model.base={tmp_path / 'nowhere'}", f"workdir={tmp_path / 'ws'}"])
    with pytest.raises(UserError, match="is not a directory"):
        loading.check_base(r2)


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert loading.is_offline()
    real = load_recipe("demo", ["model.base=PixArt-alpha/PixArt-XL-2-512x512", f"workdir={tmp_path / 'ws'}"])
    assert loading.resolve_base(real) == "PixArt-alpha/PixArt-XL-2-512x512"  # an id, not a path
    # An id no cache can hold, so the outcome does not depend on what this machine has downloaded.
    repo = "medsynth-tests/never-cached-pixart"
    r = load_recipe("demo", [f"model.base={repo}", f"workdir={tmp_path / 'ws'}"])
    with pytest.raises(UserError) as e:
        loading.check_base(r)
    msg = str(e.value)
    assert f"'{repo}'" in msg and "not in the Hugging Face cache" in msg
    assert f"hf download {repo} --local-dir DIR" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        loading.load_tokenizer(r)
    with pytest.raises(UserError, match=repo):
        loading.load_components(r, parts=("scheduler",), device="cpu")


def test_resolvers(monkeypatch):
    assert loading.resolve_dtype("bf16") == torch.bfloat16 and loading.resolve_dtype("fp32") == torch.float32
    with pytest.raises(UserError, match="fp64"):
        loading.resolve_dtype("fp64")
    assert loading.resolve_device("cpu").type == "cpu"
    assert loading.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="not a device"):
        loading.resolve_device("gpu0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not loading.is_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert loading.is_offline()


def test_tiny_rejects_resolution_off_the_grid(built):
    r, _ = built
    bad = _recipe(Path(r.data.root), r.workdir_path, "model.resolution=36")
    with pytest.raises(UserError, match="multiple of 8"):
        loading.resolve_base(bad)


def test_autoencoder_choice_keys_the_cache_and_picks_the_vae_class(built, comps):
    import json

    r, base = built
    info = json.loads((base / tiny.INFO_FILE).read_text())
    assert info["format"] == tiny.TINY_FORMAT >= 3 and info["vae"]["autoencoder"] == "fitted"
    assert type(comps.vae).__name__ == "AutoencoderKL"
    kw = {"subfolder": "vae", "revision": None, "local_files_only": True}
    assert loading._vae_class(str(base), kw).__name__ == "AutoencoderKL"
    taef2 = _recipe(Path(r.data.root), r.workdir_path, "model.tiny.autoencoder=taef2")
    assert tiny.base_dir(taef2) != base
    assert (tiny.vae_factor(taef2.model.tiny), tiny.latent_channels(taef2.model.tiny), tiny.dit_patch_size(taef2.model.tiny)) == (8, 32, 1)
    assert tiny.transformer_config(taef2)["patch_size"] == 1 and tiny.transformer_config(r)["patch_size"] == 2
