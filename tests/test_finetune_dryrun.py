"""`medsynth finetune --dry-run`: counts equal the loop's, JSON shape, nothing written, errors; the
activation formulas against what autograd really keeps."""

from __future__ import annotations

import json
import re
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medsynth.models import pixart
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import ONE_THREAD
from _helpers import TINY_FT_MODEL, link_subset, set_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _subset(src: Path, dst: Path, classes=("polyps", "normal-cecum"), per_class=4) -> Path:
    return link_subset(src, dst, classes, per_class)


FT = {"finetune.adapter": "lora", "finetune.batch_size": 2, "finetune.hldf.every_n_steps": 1, "finetune.hldf.steps": 2,
      "finetune.sample_every": 1000, "finetune.samples_per_class": 1, "synthesize.steps": 2}


def _sets(tmp: Path, data: Path, **extra) -> list[str]:
    return set_args(tmp, data, TINY_FT_MODEL, FT, extra)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def prepared(tmp_path, shared_data, cli):
    data = _subset(shared_data / "hyperkvasir", tmp_path / "data")
    r = cli("prepare", "demo", "-q", *_sets(tmp_path, data), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return tmp_path, data


@pytest.mark.slow  # trains one step with the tiny base: ~60-90 s on a shared 2-core CPU
def test_counts_equal_the_loops(prepared, cli):
    tmp, data = prepared
    sets = _sets(tmp, data)
    # Before the tiny base exists (configs computed in memory, nothing built) ...
    before = cli("--json", "finetune", "demo", "--dry-run", *sets, env=ONE_THREAD)
    assert before.returncode == 0, before.stderr
    assert not (tmp / "ws" / "tiny-base").exists()
    r = cli("finetune", "demo", "--max-steps", "1", *sets, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", r.stderr)
    assert m, r.stderr[-2000:]
    n_train, n_total = (int(x.replace(",", "")) for x in m.groups())
    # ... and after (configs read from the built base directory).
    after = cli("--json", "finetune", "demo", "--dry-run", *sets, env=ONE_THREAD)
    assert after.returncode == 0, after.stderr
    for out in (before, after):
        res = json.loads(out.stdout)
        p = res["parameters"]
        assert p["all"]["trainable"] == n_train
        assert p["loop_total"] == n_total
        assert p["transformer"]["trainable"] > 0 and p["text_encoder"]["trainable"] > 0
        assert p["vae"]["trainable"] == 0 and p["vae"]["frozen"] > 0


def test_json_shape_and_nothing_written(prepared, cli):
    tmp, data = prepared
    ws = tmp / "ws"
    snap = _tree(ws)
    r = cli("--json", "finetune", "demo", "--dry-run", "--step-seconds", "0.5", *_sets(tmp, data), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert _tree(ws) == snap and not (ws / "finetune").exists()
    res = json.loads(r.stdout)
    assert res["dry_run"] is True and res["stage"] == "finetune"
    for k in ("transformer", "text_encoder", "vae"):
        assert set(res["parameters"][k]) == {"trainable", "frozen", "total"}
    terms = {t["name"]: t for t in res["memory"]["terms"]}
    assert {"weights: transformer", "weights: text_encoder", "weights: vae", "gradients", "optimizer states",
            "framework overhead"} <= set(terms)
    assert any(n.startswith("activations: ") for n in terms)
    assert res["memory"]["peak_bytes"] == sum(t["bytes"] for t in res["memory"]["terms"])
    assert set(res["verdict"]) == {"24GB", "40GB", "80GB"} and set(res["verdict"].values()) <= {"fits", "does not fit"}
    assert res["train_images"] == 6  # 2 classes x 4 images, 80/20 split per class -> 3 + 3
    assert res["optimizer_steps_per_epoch"] == 3 and res["epoch_seconds"] == pytest.approx(1.5)
    # the human table: same counts, no throughput -> "unknown"
    t = cli("finetune", "demo", "--dry-run", *_sets(tmp, data), env=ONE_THREAD)
    assert t.returncode == 0, t.stderr
    assert f"{res['parameters']['transformer']['trainable']:,}" in t.stdout
    assert "time per epoch: unknown" in t.stdout and "24GB:" in t.stdout
    assert _tree(ws) == snap


def test_bad_recipe_exits_1(tmp_path, cli):
    r = cli("finetune", "demo", "--dry-run", "--set", f"model.base={tmp_path / 'no-such-base'}",
            "--set", f"workdir={tmp_path / 'ws'}", env=ONE_THREAD)
    assert r.returncode == 1
    assert "model.base" in r.stderr and "no-such-base" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    r = cli("finetune", "demo", "--dry-run", "--set", f"model.base={tmp_path / 'half'}",
            "--set", f"workdir={tmp_path / 'ws'}", env=ONE_THREAD)
    assert r.returncode == 1 and "transformer/config.json" in r.stderr, r.stderr
    r = cli("finetune", "demo", "--dry-run", "--set", "finetune.lora.rank=0", env=ONE_THREAD)
    assert r.returncode == 1 and "finetune.lora.rank" in r.stderr
    assert not (tmp_path / "ws").exists()


# ----------------------------------------------------------------------------- formulas vs autograd


class _Saved:
    """Bytes of distinct storages autograd keeps (parameters excluded: they exist anyway)."""

    def __init__(self, *models):
        self.params = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
        self.seen: dict[int, int] = {}

    def __enter__(self):
        def pack(t):
            k = t.untyped_storage().data_ptr()
            if k not in self.params:
                self.seen.setdefault(k, t.untyped_storage().nbytes())
            return t

        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *a):
        self.ctx.__exit__(*a)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class _Live(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops while active (forward and backward), the
    CPU stand-in for a GPU's max_memory_allocated. Parameters and buffers are excluded (views of
    them, e.g. a weight's transpose, share their storage); a storage counts until it is freed."""

    def __init__(self, *models):
        super().__init__()
        self.keys = {t.untyped_storage().data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]}
        self.cur = self.peak = 0

    def _free(self, key, n):
        self.keys.discard(key)
        self.cur -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.keys:
                    self.keys.add(key)
                    self.cur += st.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


_VAE_CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=2,
                latent_channels=4, norm_num_groups=8, sample_size=64)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vae_decode_peak_matches_live_memory(checkpointing):
    """The decode's whole forward + backward peak, with the decoder's own gradient checkpointing as
    the loop enables it: kept block inputs + the largest recomputed block (its input counted once)
    + its output gradients; the head's tensors are freed before any block is recomputed."""
    from diffusers import AutoencoderKL

    from medsynth.finetune.estimate import vae_decode_elems

    torch.manual_seed(0)
    vae = AutoencoderKL(**_VAE_CFG).requires_grad_(False).eval()
    if checkpointing:
        vae.enable_gradient_checkpointing()
    B, res = 2, 64
    z = torch.randn(B, 4, res // 4, res // 4, requires_grad=True)
    with _Live(vae) as live:
        vae.decode(z, return_dict=False)[0].flatten(2).std(-1).sum().backward()
    norm, conv, work = vae_decode_elems(B, res, {**_VAE_CFG, "block_out_channels": [32, 64, 64]}, checkpointing)
    assert (norm + conv + work) * 4 == pytest.approx(live.peak, rel=0.1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hldf_solver_steps_peak_matches_live_memory(checkpointing):
    """M differentiable DPM-Solver++ steps with CFG, then backward: what every step keeps (the T5
    embeddings kept once for all steps) plus the first backward's working set."""
    from diffusers import DPMSolverMultistepScheduler

    from medsynth import sampling
    from medsynth.finetune.estimate import hldf_dit_elems
    from medsynth.models.backbone import Cond
    from medsynth.models.pixart import BACKBONE

    H, hd, layers, lat, L, Ct = 4, 16, 2, 16, 12, 48
    tr = _tiny_dit(H, hd, layers, lat, Ct, "paper")
    if checkpointing:
        tr.enable_gradient_checkpointing()
    B, M = 2, 3
    g = torch.Generator().manual_seed(0)
    emb, neg = torch.randn(B, L, Ct, generator=g), torch.randn(B, L, Ct, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    x = torch.randn(B, 4, lat, lat, generator=g)
    with _Live(tr) as live:
        out = sampling.denoise(BACKBONE, tr, DPMSolverMultistepScheduler().config, x,
                               Cond({"embeds": emb, "mask": mask}), Cond({"embeds": neg, "mask": mask}), steps=M,
                               guidance=4.5, grad=True)
        out.pow(2).mean().backward()
    D = H * hd
    kept, work = hldf_dit_elems(M, 2 * B, (lat // 2) ** 2, D, 4 * D, H, L, Ct, 4, lat, layers, checkpointing, True)
    # The formulas leave LoRA's rank-wide intermediates out and count the backward's working set at
    # its largest; the checkpointed DiT's block recompute is the less exact part.
    assert (kept + work) * 4 == pytest.approx(live.peak, rel=0.3)
    assert (kept + work) * 4 >= live.peak * 0.95


def test_vae_decode_formula_matches_autograd():
    from diffusers import AutoencoderKL

    from medsynth.finetune.estimate import vae_decode_elems

    cfg = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=2,
               latent_channels=4, norm_num_groups=8, sample_size=64)
    vae = AutoencoderKL(**cfg).requires_grad_(False).eval()
    B, res = 2, 64
    z = torch.randn(B, 4, res // 4, res // 4, requires_grad=True)
    with _Saved(vae) as s:
        vae.decode(z, return_dict=False)[0]
    norm, conv, _ = vae_decode_elems(B, res, {**cfg, "block_out_channels": list(cfg["block_out_channels"])})
    assert (norm + conv) * 4 == pytest.approx(s.total, rel=0.05)


def _tiny_dit(H, hd, layers, lat, Ct, preset):
    from diffusers import PixArtTransformer2DModel

    from medsynth.finetune import lora

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(num_attention_heads=H, attention_head_dim=hd, in_channels=4, out_channels=8,
                                  num_layers=layers, cross_attention_dim=H * hd, attention_bias=True, sample_size=lat,
                                  patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                  caption_channels=Ct)
    lc = SimpleNamespace(rank=4, alpha=4, dropout=0.0, init="default", dora=False)
    lora.add_lora(tr, lc, pixart.DIT_TARGETS[preset], "dit")
    return lora.set_train_mode(tr, False)


@pytest.mark.parametrize("preset", ["paper", "attn_ff"])
def test_dit_formula_matches_autograd(preset):
    from medsynth.finetune.estimate import dit_step_elems

    H, hd, layers, lat, L, Ct = 4, 16, 2, 16, 12, 48
    tr = _tiny_dit(H, hd, layers, lat, Ct, preset)
    B = 2
    with _Saved(tr) as s:
        tr(torch.randn(B, 4, lat, lat), encoder_hidden_states=torch.randn(B, L, Ct),
           encoder_attention_mask=torch.ones(B, L, dtype=torch.long), timestep=torch.tensor([3, 500]),
           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    D = H * hd
    est = dit_step_elems(B, (lat // 2) ** 2, D, 4 * D, H, L, Ct, 4, lat, layers, False, preset == "paper") * 4
    # LoRA's rank-wide intermediates and a few per-token statistics are left out of the formula.
    assert est == pytest.approx(s.total, rel=0.15)


@pytest.mark.parametrize("boc,lpb,attn", [((32, 64, 64), 2, True), ((16, 32, 64), 1, True), ((8, 32), 1, True),
                                          ((8, 32), 2, False)])
def test_vae_encode_peak_matches_live_memory(boc, lpb, attn):
    """The latent cache's no-grad encode: the formula's maps equal the live storages of vae.encode."""
    from diffusers import AutoencoderKL

    from medsynth.finetune.estimate import vae_encode_elems

    cfg = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(boc),
               up_block_types=("UpDecoderBlock2D",) * len(boc), block_out_channels=list(boc), layers_per_block=lpb,
               latent_channels=4, norm_num_groups=8, sample_size=64, mid_block_add_attention=attn)
    vae = AutoencoderKL(**cfg).requires_grad_(False).eval()
    B, res = 3, 64
    px = torch.randn(B, 3, res, res)  # made outside the mode: the formula's image term is left out below
    with torch.no_grad(), _Live(vae) as live:
        vae.encode(px).latent_dist.parameters.float()
    assert (vae_encode_elems(B, res, cfg) - B * 3 * res * res) * 4 == live.peak
