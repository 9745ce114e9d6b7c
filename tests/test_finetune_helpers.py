"""Tiny real PixArt-layout components built from configs (no hub, seeded) for finetune/HLDF unit tests.

Imported by tests/test_finetune*.py and tests/test_hldf.py; its own tests cover small finetune helpers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medsynth.models import pixart

PIXART_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                        lower_order_final=True, thresholding=False)


def tiny_tokenizer(words=("a", "an", "endoscopic", "dermoscopic", "image", "of", "polyp", "ulcer", "red", "pink",
                          "smooth", "lesion", "with", "surface")):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_components(seed: int = 0, res: int = 32, text_dim: int = 32, text_dropout: float = 0.0):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=res, scaling_factor=0.5)
    transformer = PixArtTransformer2DModel(
        sample_size=res // 2, num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=text_dim, patch_size=2,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000)
    te = T5EncoderModel(T5Config(vocab_size=32, d_model=text_dim, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", dropout_rate=text_dropout, is_encoder_decoder=False))
    sched = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    return SimpleNamespace(transformer=transformer, text_encoder=te, tokenizer=tiny_tokenizer(), vae=vae,
                           scheduler=sched, base="tiny-test")


def lora_settings(**kw):
    from medsynth.recipe import LoraConfig

    return LoraConfig(**kw)


@pytest.mark.parametrize("base_dropout", [False, True])
def test_set_train_mode_base_dropout(base_dropout):
    """finetune.base_dropout on a T5 with T5 v1.1's dropout_rate 0.1 carrying LoRA (LoRA dropout 0):
    false -> two training-mode forwards agree exactly (base in eval, only lora_dropout trains);
    true -> the base dropout makes them differ (the old behaviour, whole module .train())."""
    from medsynth.finetune import lora

    c = tiny_components(text_dropout=0.1)
    lora.add_lora(c.text_encoder, lora_settings(rank=4, alpha=4.0, dropout=0.0), pixart.T5_TARGETS["full"], "T5")
    lora.add_lora(c.transformer, lora_settings(rank=4, alpha=4.0, dropout=0.5), pixart.DIT_TARGETS["paper"], "DiT")
    for m in (c.text_encoder, c.transformer):
        lora.set_train_mode(m, base_dropout)
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    torch.manual_seed(0)
    a, b = c.text_encoder(ids)[0], c.text_encoder(ids)[0]
    assert torch.equal(a, b) != base_dropout
    drops = {n: m.training for n, m in c.transformer.named_modules() if isinstance(m, torch.nn.Dropout)}
    lora_drops = {n: t for n, t in drops.items() if "lora_dropout" in n}
    assert lora_drops and all(lora_drops.values())  # LoRA dropout trains either way
    assert all(t == base_dropout for n, t in drops.items() if n not in lora_drops)
