"""LoRA presets, trainable parameters, and saved adapters (PEFT format) on tiny real models."""

from __future__ import annotations

import json

import pytest
import torch

from medsynth.finetune import adapters, lora
from medsynth.models import pixart
from test_finetune_helpers import lora_settings, tiny_components


def _fwd(tr, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    from medsynth.models.pixart import predict_noise

    with torch.no_grad():
        return predict_noise(tr, x, torch.tensor([10, 500]), ctx, torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("preset", ["paper", "attn_ff"])
@pytest.mark.parametrize("dora", [False, True])
def test_only_adapter_params_trainable_and_count_matches(preset, dora):
    c = tiny_components()
    lc = lora_settings(rank=4, alpha=4.0, dora=dora)
    base_dit = sum(p.numel() for p in c.transformer.parameters())
    lora.add_lora(c.transformer, lc, pixart.DIT_TARGETS[preset], "dit")
    lora.add_lora(c.text_encoder, lc, pixart.T5_TARGETS["full"], "t5")
    for model in (c.transformer, c.text_encoder):
        for n, p in model.named_parameters():
            assert p.requires_grad == ("lora_" in n), n
            if p.requires_grad:
                assert p.dtype == torch.float32
    fresh = tiny_components()
    want_dit = lora.expected_lora_params(fresh.transformer, pixart.DIT_TARGETS[preset], 4, dora)
    want_t5 = lora.expected_lora_params(fresh.text_encoder, pixart.T5_TARGETS["full"], 4, dora)
    got_dit = sum(p.numel() for p in c.transformer.parameters() if p.requires_grad)
    got_t5 = sum(p.numel() for p in c.text_encoder.parameters() if p.requires_grad)
    assert (got_dit, got_t5) == (want_dit, want_t5)
    # The frozen base is untouched in size.
    assert sum(p.numel() for n, p in c.transformer.named_parameters() if "lora_" not in n) == base_dit


def test_paper_preset_hits_embedders_adaln_and_projections():
    c = tiny_components()
    paper = set(lora.matched_modules(c.transformer, pixart.DIT_TARGETS["paper"]))
    attn_ff = set(lora.matched_modules(c.transformer, pixart.DIT_TARGETS["attn_ff"]))
    extra = paper - attn_ff
    assert extra == {"pos_embed.proj", "proj_out", "adaln_single.linear",
                     "adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
                     "caption_projection.linear_1", "caption_projection.linear_2"}
    assert len(attn_ff) == 2 * 10  # 2 blocks x (2 attentions x 4 + 2 FF)


def test_t5_paper_parity_misses_gated_ffn_inputs():
    c = tiny_components()
    full = lora.matched_modules(c.text_encoder, pixart.T5_TARGETS["full"])
    parity = lora.matched_modules(c.text_encoder, pixart.T5_TARGETS["paper_parity"])
    assert any(n.endswith("wi_0") for n in full) and any(n.endswith("wi_1") for n in full)
    assert not any(n.endswith(("wi_0", "wi_1")) for n in parity)
    assert len(full) == 2 * 7 and len(parity) == 2 * 5


def test_saved_adapters_load_with_peft_and_change_output(tmp_path):
    from peft import PeftModel

    c = tiny_components()
    lc = lora_settings(rank=4, alpha=8.0)
    cfg = lora.add_lora(c.transformer, lc, pixart.DIT_TARGETS["paper"], "dit")
    te_cfg = lora.add_lora(c.text_encoder, lc, pixart.T5_TARGETS["full"], "t5")
    with torch.no_grad():  # stand-in for training: B is zero-initialised, so move it
        for n, p in list(c.transformer.named_parameters()) + list(c.text_encoder.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    trained_out = _fwd(c.transformer)
    adapters.save_peft_dir(c.transformer, cfg, tmp_path / "final" / "transformer", "tiny-test", "transformer")
    adapters.save_peft_dir(c.text_encoder, te_cfg, tmp_path / "final" / "text_encoder", "tiny-test", "text_encoder")
    (tmp_path / "final" / "adapter.json").write_text(json.dumps({"kind": "lora"}))

    base = tiny_components()
    base_out = _fwd(base.transformer)
    loaded = PeftModel.from_pretrained(base.transformer, str(tmp_path / "final" / "transformer"))
    loaded_out = _fwd(loaded)
    assert not torch.allclose(loaded_out, base_out, atol=1e-4)
    assert torch.allclose(loaded_out, trained_out, atol=1e-5)

    # apply_finetuned merges the LoRA into fresh base components: same function as the trained model.
    merged = adapters.apply_finetuned(tiny_components(), tmp_path)
    assert not any("lora_" in n for n, _ in merged.transformer.named_parameters())
    assert torch.allclose(_fwd(merged.transformer), trained_out, atol=1e-4)
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        assert torch.allclose(merged.text_encoder(ids)[0], c.text_encoder(ids)[0], atol=1e-4)

    # Unmerged (LoRA layers kept, in place on the same modules): the same function again.
    base = tiny_components()
    tr = base.transformer
    unmerged = adapters.apply_finetuned(base, tmp_path, merge=False)
    assert unmerged.transformer is tr and any("lora_" in n for n, _ in tr.named_parameters())
    assert torch.allclose(_fwd(unmerged.transformer), trained_out, atol=1e-5)
    # Only the asked-for parts are touched.
    only_te = adapters.apply_finetuned(tiny_components(), tmp_path, parts=("text_encoder",))
    assert torch.allclose(_fwd(only_te.transformer), base_out, atol=1e-6)
    assert adapters.lora_parts(tmp_path) == ("transformer", "text_encoder")

    h1 = adapters.adapter_hash(tmp_path)
    (tmp_path / "final" / "adapter.json").write_text(json.dumps({"kind": "lora", "x": 1}))
    assert adapters.adapter_hash(tmp_path) != h1
