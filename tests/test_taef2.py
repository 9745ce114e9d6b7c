"""The pretrained TAEF2 autoencoder shipped with medsynth, alone and as the tiny base's ``vae/`` (CPU, offline).

Real images from ../shared/data; the weights are the ones in the package (medsynth/models/weights/).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsynth.models import loading, tiny
from medsynth.models.taef2 import WEIGHTS, AutoencoderTAEF2

from _helpers import link_subset, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("melanoma", "dermatofibroma", "vascular-lesion")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return AutoencoderTAEF2.from_shipped()


def _real_images(root: Path, n: int) -> list[torch.Tensor]:
    """n images spread over the classes, at their own size cut down to a multiple of 8, in [-1, 1]."""
    paths = sorted(root.rglob("*.jpg"))[::37][:n]
    out = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"))
        a = a[: a.shape[0] // 8 * 8, : a.shape[1] // 8 * 8]
        out.append(torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return out


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = float(((y.clamp(-1, 1) - x) / 2).pow(2).mean())
    return 10 * np.log10(1.0 / mse)


def test_shipped_file_loads_strictly_and_matches_the_upstream_files(model):
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert keys == set(model.state_dict()) and len(keys) == 158  # 79 encoder + 79 decoder tensors
    assert dtypes == {"F16"}
    assert {"encoder.11.pool.1.weight", "decoder.3.pool.0.weight"} <= keys  # the pool branches AutoencoderTiny lacks
    assert (WEIGHTS.parent / "LICENSE-TAEF2.txt").is_file()
    assert "Ollin Boer Bohan" in (WEIGHTS.parent / "LICENSE-TAEF2.txt").read_text()
    src = ROOT.parent / "shared" / "weights" / "taef2"
    if src.is_dir():  # same values as the files they were converted from (bench/convert_taef2.py)
        sd = model.state_dict()
        for part in ("encoder", "decoder"):
            ref = torch.load(src / f"taef2_{part}.pth", map_location="cpu", weights_only=True)
            for k, v in ref.items():
                assert torch.equal(sd[f"{part}.{k}"], v.float()), k


def test_reconstructs_real_images(model, shared_data):
    # Measured when written (these 4 images each): HAM10000 ~35 dB, HyperKvasir ~33 dB; a wrong
    # block (e.g. pool branch dropped or misplaced) gives < 20 dB.
    for name, floor in (("ham10000", 32.0), ("hyperkvasir", 30.0)):
        vals = []
        for x in _real_images(shared_data / name, 4):
            with torch.no_grad():
                post = model.encode(x[None]).latent_dist
                z = post.mode()
                y = model.decode(z).sample
            assert z.shape == (1, 32, x.shape[1] // 8, x.shape[2] // 8)
            assert y.shape == x[None].shape
            assert float(y.min()) > -1.5 and float(y.max()) < 1.5  # unclamped, slightly past [-1, 1] at most
            vals.append(_psnr(x[None], y))
        assert np.mean(vals) > floor, (name, vals)  # also checks the [-1, 1] interface: [0, 1] out would be ~10 dB


def test_latent_distribution_is_deterministic_like_autoencoder_kl(model):
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        post = model.encode(x).latent_dist
    z = post.mode()
    assert torch.equal(post.mean, z)
    assert torch.equal(post.sample(generator=torch.Generator().manual_seed(1)), z)
    p = post.parameters
    assert p.shape == (2, 64, 4, 6)
    mean, logvar = p.chunk(2, dim=1)
    assert torch.equal(mean, z) and (logvar == -30).all()
    # finetune/loop.py draws mean + exp(logvar / 2) * noise from cached parameters: that is mean.
    draw = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape)
    torch.testing.assert_close(draw, z, atol=1e-5, rtol=0)
    assert float(post.kl().abs().max()) == 0.0
    y = model.decode(z, return_dict=False)
    assert isinstance(y, tuple) and y[0].shape == x.shape
    assert 2 ** (len(model.config.block_out_channels) - 1) == 8 and model.config.latent_channels == 32


def test_save_pretrained_round_trip_keeps_shift_and_scale(model, tmp_path):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m = AutoencoderTAEF2.from_shipped()
    stats = tiny._centre_and_scale_taef2(m, x)
    assert m.config.latent_shift is not None and len(m.config.latent_shift) == 32
    with torch.no_grad():
        z = m.encode(x).latent_dist.mode()
        y = m.decode(z).sample
        y0 = model.decode(model.encode(x).latent_dist.mode()).sample
    # Centring is invisible to a round trip, and the centred latents are zero-mean, unit std once scaled.
    torch.testing.assert_close(y, y0, atol=1e-4, rtol=0)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert abs(float(z.std()) * m.config.scaling_factor - 1) < 1e-3
    assert stats["scaling_factor"] == pytest.approx(m.config.scaling_factor, rel=1e-5)

    m.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTAEF2"
    back = AutoencoderTAEF2.from_pretrained(str(tmp_path / "vae"), torch_dtype=torch.float32).eval()
    assert back.config.latent_shift == pytest.approx(m.config.latent_shift)
    assert back.config.scaling_factor == pytest.approx(m.config.scaling_factor)
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(x).latent_dist.mode()).sample, y)
    # load_components picks the class from config.json; a real base's AutoencoderKL stays AutoencoderKL.
    kw = {"subfolder": "vae", "revision": None, "local_files_only": True}
    assert loading._vae_class(str(tmp_path), kw) is AutoencoderTAEF2


def test_gradient_checkpointing_gives_the_same_gradients(model):
    z = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        m = AutoencoderTAEF2.from_shipped()
        if ckpt:
            m.enable_gradient_checkpointing()
        zz = z.clone().requires_grad_(True)
        m.decode(zz).sample.square().mean().backward()
        grads.append(zz.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- as the tiny base's autoencoder


@pytest.fixture(scope="module")
def taef2_base(tmp_path_factory):
    from medsynth import data
    from medsynth.recipe import load_recipe

    root = tmp_path_factory.mktemp("taef2base")
    link_subset(shared_data_dir() / "ham10000", root / "images", CLASSES, per_class=4)
    sets = [f"data.root={root / 'images'}", f"workdir={root / 'ws'}", "model.tiny.autoencoder=taef2",
            "model.tiny.layers=2", "model.tiny.text_layers=1", "model.max_text_tokens=24",
            "finetune.batch_size=4", "finetune.hldf.every_n_steps=2", "finetune.hldf.steps=2",
            "finetune.checkpoint_every=1000", "finetune.sample_every=1000", "finetune.log_every=1",
            "finetune.samples_per_class=1", "synthesize.steps=2", "synthesize.batch_size=3"]
    r = load_recipe("demo", sets)
    data.run(r)
    base = Path(loading.resolve_base(r))
    return r, base, sets


def test_tiny_base_with_taef2_layout(taef2_base):
    r, base, _ = taef2_base
    info = json.loads((base / tiny.INFO_FILE).read_text())
    assert info["vae"]["autoencoder"] == "taef2" and info["vae"]["fit_seconds"] == 0.0
    assert info["vae"]["train_psnr_db"] > 28  # 64 px HAM10000 crops: ~31.7 dB when written (fitted VAE: ~25)
    comps = loading.load_components(r, device="cpu", dtype="fp32")
    assert type(comps.vae) is AutoencoderTAEF2
    tc = comps.transformer.config
    assert (tc.in_channels, tc.out_channels, tc.patch_size, tc.sample_size) == (32, 64, 1, 8)
    # Scaled, centred latents of the train images: zero mean per channel, unit std (as the DiT wants).
    from medsynth import data

    rows = data.read_manifest(r.workdir_path, "train")
    images = tiny.load_images([row.path for row in rows], r.model.resolution)
    with torch.no_grad():
        z = comps.vae.encode(images).latent_dist.mode() * comps.vae.config.scaling_factor
    assert abs(float(z.std()) - 1.0) < 1e-3 and z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    # The fitted default and the TAEF2 base live in different cache directories.
    from medsynth.recipe import load_recipe

    fitted = load_recipe("demo", [*(s for s in taef2_base[2] if "autoencoder" not in s), "model.tiny.autoencoder=fitted"])
    assert tiny.base_dir(fitted) != base
    # The fitted VAE's settings do not touch a TAEF2 base (no needless rebuild); the DiT's do.
    assert tiny.base_dir(load_recipe("demo", [*taef2_base[2], "model.tiny.vae_fit_steps=7", "model.tiny.latent_channels=8"])) == base
    assert tiny.base_dir(load_recipe("demo", [*taef2_base[2], "model.tiny.heads=2"])) != base


def test_tiny_base_with_taef2_rejects_resolution_off_the_grid(taef2_base):
    from medsynth.errors import UserError
    from medsynth.recipe import load_recipe

    r, _, sets = taef2_base
    bad = load_recipe("demo", [*sets, "model.resolution=36"])
    with pytest.raises(UserError, match="TAEF2.*multiple of 8; e.g. --set model.resolution=32"):
        loading.resolve_base(bad)


def test_sampling_decodes_taef2_latents_to_minus_one_one(taef2_base):
    from medsynth import sampling

    r, _, _ = taef2_base
    comps = loading.load_components(r, device="cpu", dtype="fp32")
    # The untrained DiT's output is far from data latents; the soft clamp keeps decode in range.
    from medsynth.models.pixart import BACKBONE

    imgs = sampling.generate(BACKBONE, comps, ["A dermoscopic image of melanoma"] * 2, [0, 1], resolution=r.model.resolution,
                             steps=2, guidance=2.0, max_length=r.model.max_text_tokens)
    assert imgs.shape == (2, 3, 64, 64) and imgs.min() >= -1 and imgs.max() <= 1 and imgs.std() > 0
    # Wild latents (x100 their scale) stay bounded: the decoder's soft clamp (2.2 at most, measured).
    with torch.no_grad():
        raw = sampling.decode(comps.vae, torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(0)) * 100)
    assert raw.shape == (4, 3, 64, 64) and torch.isfinite(raw).all() and raw.abs().max() < 3


def test_tiny_base_with_taef2_finetunes_and_synthesizes(taef2_base):
    from medsynth import finetune, synthesize
    from medsynth.synthesize.writer import iter_shard

    r, _, _ = taef2_base
    ft = finetune.run(r, max_steps=4)
    log = [json.loads(x) for x in (ft / "log.jsonl").read_text().splitlines() if x.strip()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert all(np.isfinite(x["loss/diffusion"]) for x in log)
    assert [x["step"] for x in log if "loss/hldf" in x] == [2, 4]  # HLDF decodes TAEF2 latents with gradients
    out = synthesize.run(r, per_class=1, out=r.workdir_path / "synth")
    got = [k for p in sorted(out.glob("synth-*.tar")) for k, _ in iter_shard(p)]
    assert len(got) == len(CLASSES)
