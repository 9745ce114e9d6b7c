"""HLDF: colour loss known answers, gradients through the differentiable sampler to DiT and T5 LoRA."""

from __future__ import annotations

import pytest
import torch

from medsynth import sampling
from medsynth.finetune import hldf, lora
from medsynth.models import pixart
from medsynth.recipe import HldfConfig
from test_finetune_helpers import lora_settings, tiny_components

BB = pixart.BACKBONE


def test_colour_loss_known_answer():
    # Image 0: channel c is constant c/10 -> mean c/10, std 0.
    # Image 1: channel c alternates +-(c+1)/4 -> mean 0, std (c+1)/4 (population std).
    a = torch.stack([torch.full((4, 4), c / 10) for c in range(3)])
    sign = torch.tensor([[1.0, -1.0] * 2, [-1.0, 1.0] * 2] * 2)
    b = torch.stack([sign * (c + 1) / 4 for c in range(3)])
    gen = torch.stack([a, b])
    real_mean = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    real_std = torch.tensor([[0.2, 0.2, 0.2], [0.0, 0.0, 0.0]])
    lm, ls = hldf.colour_loss(gen, real_mean, real_std)
    want_m = ((0.0 - 0.5) ** 2 + (0.1 - 0.5) ** 2 + (0.2 - 0.5) ** 2) / 6
    want_s = (3 * 0.2 ** 2 + 0.25 ** 2 + 0.5 ** 2 + 0.75 ** 2) / 6
    assert lm.item() == pytest.approx(want_m, rel=1e-6)
    assert ls.item() == pytest.approx(want_s, rel=1e-6)
    # Identical statistics -> zero; the real stats helper agrees with the loss's own.
    m, s = hldf.colour_stats(gen)
    z1, z2 = hldf.colour_loss(gen, m, s)
    assert z1.item() == 0.0 and z2.item() == pytest.approx(0.0, abs=1e-12)


def test_channel_sum_is_three_times_channel_mean():
    """finetune.hldf.channel_reduction: 'sum' (the paper's Eq. 4) = 3 x 'mean' (the official code)."""
    g = torch.Generator().manual_seed(3)
    gen = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    real_mean, real_std = torch.rand(2, 3, generator=g) - 0.5, torch.rand(2, 3, generator=g) * 0.5
    mean = hldf.colour_loss(gen, real_mean, real_std)
    assert mean == hldf.colour_loss(gen, real_mean, real_std, "mean")  # the default stays the official one
    summed = hldf.colour_loss(gen, real_mean, real_std, "sum")
    for a, b in zip(summed, mean):
        assert a.item() == pytest.approx(3 * b.item(), rel=1e-6) and b.item() > 0
    with pytest.raises(ValueError, match="'max'"):
        hldf.colour_loss(gen, real_mean, real_std, "max")


def test_hldf_step_follows_channel_reduction():
    c = _setup(text_encoder=False)
    with torch.no_grad():
        cond = BB.encode(c, ["a red polyp"], 8, "cpu")
    real = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    m, s = hldf.colour_stats(real)
    out = {}
    for red in ("mean", "sum"):
        hc = HldfConfig(steps=2, guidance=1.0, channel_reduction=red)
        out[red] = hldf.hldf_step(BB, c.transformer, c.vae, c.scheduler.config, hc, cond, None, m, s,
                                  torch.Generator().manual_seed(0), (1, 4, 16, 16))
    assert torch.equal(out["mean"].images, out["sum"].images)  # same samples, only the reduction differs
    assert out["sum"].loss.item() == pytest.approx(3 * out["mean"].loss.item(), rel=1e-5)
    assert out["sum"].color_mean.item() == pytest.approx(3 * out["mean"].color_mean.item(), rel=1e-5)


def test_weight_default_is_one_over_m():
    assert hldf.hldf_weight(HldfConfig(steps=20)) == pytest.approx(1 / 20)
    assert hldf.hldf_weight(HldfConfig(steps=20, weight=0.3)) == pytest.approx(0.3)


def _setup(text_encoder=True):
    c = tiny_components()
    lc = lora_settings(rank=4, alpha=4.0)
    lora.add_lora(c.transformer, lc, pixart.DIT_TARGETS["paper"], "dit")
    if text_encoder:
        lora.add_lora(c.text_encoder, lc, pixart.T5_TARGETS["full"], "t5")
    c.vae.requires_grad_(False)
    # B starts at zero, which makes A's gradient zero by construction: give B a value as after training.
    with torch.no_grad():
        for n, p in list(c.transformer.named_parameters()) + list(c.text_encoder.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    return c


@pytest.mark.parametrize("kw,ckpt", [(dict(), True), (dict(grad_last_k=2, start="noised_real", start_strength=0.5), False)])
def test_hldf_step_gives_grads_to_dit_and_t5_lora(kw, ckpt):
    c = _setup()
    hc = HldfConfig(steps=4, guidance=4.5, **kw)
    prompts = ["an endoscopic image of polyp", "an endoscopic image of ulcer"]
    cond = BB.encode(c, prompts, 12, "cpu")
    neg = BB.encode(c, ["", ""], 12, "cpu")
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    m, s = hldf.colour_stats(real)
    real_lat = c.vae.encode(real).latent_dist.mean * c.vae.config.scaling_factor
    r = hldf.hldf_step(BB, c.transformer, c.vae, c.scheduler.config, hc, cond, neg, m, s,
                       torch.Generator().manual_seed(0), (2, 4, 16, 16), real_latents=real_lat, checkpoint=ckpt)
    assert r.images.shape == (2, 3, 32, 32)
    assert r.loss.item() == pytest.approx((r.color_mean + r.color_std).item() / 4, rel=1e-5)
    r.loss.backward()
    for model, what in ((c.transformer, "DiT"), (c.text_encoder, "T5")):
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        nonzero = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
        assert len(nonzero) > len(grads) // 2, f"{what}: only {len(nonzero)}/{len(grads)} LoRA tensors got a gradient"
    assert all(p.grad is None for p in c.vae.parameters())


def test_denoise_with_grad_matches_no_grad_sampling():
    c = _setup(text_encoder=False)
    with torch.no_grad():
        cond = BB.encode(c, ["a red polyp"], 8, "cpu")
        neg = BB.encode(c, [""], 8, "cpu")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=5, guidance=3.0)
    a = sampling.denoise(BB, c.transformer, c.scheduler.config, x, cond, neg, grad=True, checkpoint=True, **kw)
    with torch.no_grad():
        b = sampling.denoise(BB, c.transformer, c.scheduler.config, x, cond, neg, **kw)
    assert a.requires_grad and not b.requires_grad
    assert torch.allclose(a.detach(), b, atol=1e-5)
    # The scheduler is fresh per call: running twice gives the same result.
    with torch.no_grad():
        b2 = sampling.denoise(BB, c.transformer, c.scheduler.config, x, cond, neg, **kw)
    assert torch.equal(b, b2)


def test_generate_depends_on_seed_not_batch():
    c = _setup(text_encoder=False)
    kw = dict(resolution=32, steps=3, guidance=4.5, max_length=8)
    one = sampling.generate(BB, c, ["a red polyp"], [7], **kw)
    many = sampling.generate(BB, c, ["an ulcer", "a red polyp"], [3, 7], batch_size=2, **kw)
    assert one.shape == (1, 3, 32, 32) and one.abs().max() <= 1.0
    assert torch.allclose(one[0], many[1], atol=1e-5)
    assert not torch.allclose(many[0], many[1])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_training_target_follows_the_scheduler(kind):
    # The finetune loop's target: the same prediction_type the samplers (and HLDF) read.
    from diffusers import DDPMScheduler

    from medsynth.sampling import training_target

    sched = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    got = training_target(sched, z0, noise, t)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = {"epsilon": noise, "sample": z0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z0}[kind]
    assert torch.allclose(got, want, atol=1e-6)


def test_training_target_rejects_unknown_kind():
    from types import SimpleNamespace

    from medsynth.sampling import training_target

    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        training_target(SimpleNamespace(config=SimpleNamespace(prediction_type="flow")), None, None, None)
