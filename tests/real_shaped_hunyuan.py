"""A real-shaped Hunyuan-DiT v1.2 base for tests and benches: the hub's configs at full width, 1-4 layers,
random seeded weights, saved in the layout of ``Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers``.

API (as tests/real_shaped.py)::

    from real_shaped_hunyuan import ensure, info, KINDS

    root = ensure("hunyuan-dit")   # -> Path of a diffusers directory laid out like HunyuanDiT-v1.2-Diffusers
    # use it as `model.base: <root>` (recipe) or with from_pretrained(root, subfolder=...)

``ensure(kind, cache=None)`` builds once into ``cache`` (default ``$MEDSYNTH_REAL_SHAPED_DIR``, else the
system temp directory), in a directory whose name carries :data:`FORMAT`, via a temporary directory
renamed into place (concurrent callers never see half-written files). ``info(root)`` returns what was
built (seconds, bytes, parameter counts).

What the directory holds:

- ``model_index.json``: HunyuanDiTPipeline with transformer, text_encoder (BertModel), tokenizer
  (BertTokenizer), text_encoder_2 (T5EncoderModel), tokenizer_2 (T5Tokenizer), vae, scheduler (DDPM),
  and ``safety_checker`` / ``feature_extractor`` null.
- ``transformer/``: HunyuanDiT2DModel, v1.2's config (hidden 1408 = 16 heads x 88, patch 2, 4 latent
  channels + learned sigma, mlp_ratio 4.3637, BERT width 1024, mT5 width 2048, 77 + 256 text tokens,
  ``use_style_cond_and_image_meta_size`` false) but :data:`DIT_LAYERS` = 4 blocks instead of 40. Hunyuan's
  long skips join block i to block L-1-i for i < L/2 - 1: 2 blocks would build no skip at all, 4 build one
  (block 0 -> block 3, with its ``skip_norm`` / ``skip_linear``), so the skip path is exercised.
- ``text_encoder/``: BertModel with the bilingual CLIP text tower's config (hidden 1024, 16 heads, FFN 4096,
  vocab 47020, dropout 0.1) and 1 layer; fp32.
- ``tokenizer/``: a WordPiece ``vocab.txt`` written here (Chinese-BERT layout: [PAD] 0, [unused1-99],
  [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then characters, ## continuations and the words of
  real_shaped.corpus()) with tokenizer_config.json / special_tokens_map.json as the hub has them.
- ``text_encoder_2/``: T5EncoderModel with mT5-XL's config (d_model 2048, d_ff 5120, 32 heads, gated-gelu,
  ``model_type`` mt5) and 1 layer, stored in fp16 in shards with an index as the hub stores it. The
  vocabulary is CUT from the hub's 250112 rows to :data:`MT5_VOCAB`: the full 250112 x 2048 embedding
  is 0.5 G parameters (1 GB on disk in fp16, 2 GB in fp32 memory in every process that loads it) and
  made the build alone take ~40 s here, over the tests' budget; the tokenizer's ids stay far below the
  cut, and no medsynth code path depends on the vocabulary size.
- ``tokenizer_2/``: ``spiece.model`` (real_shaped.train_spiece: T5/mT5 ids pad 0, eos 1, unk 2) with
  tokenizer_config.json (T5Tokenizer, extra_ids 0 as mT5) and special_tokens_map.json.
- ``vae/``: the SDXL VAE architecture (sdxl-vae-fp16-fix: scaling_factor 0.13025, force_upcast false).
- ``scheduler/scheduler_config.json``: DDPMScheduler, scaled-linear betas from 0.00085, v-prediction,
  steps_offset 1, leading spacing.

Which values are checked and which are from memory: hidden 1408 / 16 heads / mlp_ratio 4.3637 / BERT width
1024 / mT5 width 2048 / 77 + 256 tokens / 40 blocks with long skips are checked against public sources
(HunyuanDiT's model code and configs quoted in diffusers and ComfyUI). From memory (not re-checked offline):
BERT's vocab 47020 and tokenizer files, the mT5 config's extra keys, the VAE's sample_size, and the
scheduler's beta_end for v1.2: Tencent's own inference code says weights <= v1.1 need ``--beta-end 0.03``
and v1.2 does not, so v1.2's differs from 0.03; 0.018 is recalled, not checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

FORMAT = 1
KINDS = ("hunyuan-dit",)
INFO = "real_shaped.json"
DIT_LAYERS = 4
TEXT_LAYERS = 1

MODEL_INDEX = {
    "_class_name": "HunyuanDiTPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "feature_extractor": [None, None],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "BertModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "BertTokenizer"],
    "tokenizer_2": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "HunyuanDiT2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

TRANSFORMER_CONFIG = {
    "_class_name": "HunyuanDiT2DModel",
    "_diffusers_version": "0.30.0.dev0",
    "activation_fn": "gelu-approximate",
    "attention_head_dim": 88,
    "cross_attention_dim": 1024,
    "cross_attention_dim_t5": 2048,
    "hidden_size": 1408,
    "in_channels": 4,
    "learn_sigma": True,
    "mlp_ratio": 4.3637,
    "norm_type": "layer_norm",
    "num_attention_heads": 16,
    "num_layers": DIT_LAYERS,
    "patch_size": 2,
    "pooled_projection_dim": 1024,
    "sample_size": 128,
    "text_len": 77,
    "text_len_t5": 256,
    "use_style_cond_and_image_meta_size": False,
}

BERT_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "directionality": "bidi",
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 16,
    "num_hidden_layers": TEXT_LAYERS,
    "output_past": True,
    "pad_token_id": 0,
    "pooler_fc_size": 768,
    "pooler_num_attention_heads": 12,
    "pooler_num_fc_layers": 3,
    "pooler_size_per_head": 128,
    "pooler_type": "first_token_transform",
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 47020,
}

MT5_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "d_ff": 5120,
    "d_kv": 64,
    "d_model": 2048,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "mt5",
    "num_decoder_layers": TEXT_LAYERS,
    "num_heads": 32,
    "num_layers": TEXT_LAYERS,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "tokenizer_class": "T5Tokenizer",
    "use_cache": True,
    "vocab_size": 8192,  # the hub's is 250112 (HUB_MT5_VOCAB): cut, see the module docstring
}
HUB_MT5_VOCAB = 250112
MT5_VOCAB = MT5_CONFIG["vocab_size"]

# The tokenizer files beside vocab.txt / spiece.model, as transformers 4.x wrote them for the hub.
HUGE = 1000000000000000019884624838656
BERT_TOKENIZER_CONFIG = {
    "cls_token": "[CLS]", "do_basic_tokenize": True, "do_lower_case": True, "mask_token": "[MASK]",
    "model_max_length": HUGE, "never_split": None, "pad_token": "[PAD]", "sep_token": "[SEP]",
    "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]",
}
BERT_SPECIAL_TOKENS = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                       "unk_token": "[UNK]"}
MT5_TOKENIZER_CONFIG = {
    "additional_special_tokens": None, "eos_token": "</s>", "extra_ids": 0, "model_max_length": HUGE,
    "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
}
MT5_SPECIAL_TOKENS = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def vae_config() -> dict:
    """vae/config.json: the SDXL VAE (sdxl-vae-fp16-fix) that Hunyuan-DiT uses."""
    from real_shaped import VAE_CONFIG

    return {**VAE_CONFIG, "force_upcast": False, "scaling_factor": 0.13025}


SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.018,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}


def bert_vocab() -> list[str]:
    """vocab.txt lines: Chinese-BERT's special-token layout, then characters and words of the corpus."""
    import re

    from real_shaped import corpus

    words = sorted({w for line in corpus() for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return list(dict.fromkeys(head + chars + ["##" + c for c in chars] + [w for w in words if len(w) > 1]))


# ----------------------------------------------------------------------------- build


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _build(out: Path, seed: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from real_shaped import train_spiece

    t0 = time.time()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    params = {}
    _write_json(out / "model_index.json", MODEL_INDEX)

    torch.manual_seed(seed)
    tr = HunyuanDiT2DModel.from_config(TRANSFORMER_CONFIG)
    params["transformer"] = count(tr)
    tr.save_pretrained(str(out / "transformer"), safe_serialization=True)
    del tr
    _write_json(out / "transformer" / "config.json", TRANSFORMER_CONFIG)

    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.txt").write_text("".join(t + "\n" for t in bert_vocab()), encoding="utf-8")
    _write_json(out / "tokenizer" / "tokenizer_config.json", BERT_TOKENIZER_CONFIG)
    _write_json(out / "tokenizer" / "special_tokens_map.json", BERT_SPECIAL_TOKENS)
    torch.manual_seed(seed + 1)
    bert = BertModel(BertConfig(**{k: v for k, v in BERT_CONFIG.items() if k != "architectures"}))
    params["text_encoder"] = count(bert)
    bert.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    del bert
    _write_json(out / "text_encoder" / "config.json", BERT_CONFIG)

    (out / "tokenizer_2").mkdir()
    train_spiece(out / "tokenizer_2" / "spiece.model", seed=seed)
    _write_json(out / "tokenizer_2" / "tokenizer_config.json", MT5_TOKENIZER_CONFIG)
    _write_json(out / "tokenizer_2" / "special_tokens_map.json", MT5_SPECIAL_TOKENS)
    torch.manual_seed(seed + 2)
    # Built in fp16 directly: the fp32 embedding alone would take 2 GB while building.
    t5 = T5EncoderModel._from_config(T5Config(**{k: v for k, v in MT5_CONFIG.items() if k != "architectures"}),
                                     dtype=torch.float16)
    params["text_encoder_2"] = count(t5)
    t5.save_pretrained(str(out / "text_encoder_2"), safe_serialization=True, max_shard_size="100MB")
    del t5
    _write_json(out / "text_encoder_2" / "config.json", {**MT5_CONFIG, "torch_dtype": "float16"})

    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vae_config().items()})
    params["vae"] = count(vae)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    del vae
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(str(out / "scheduler"))
    return {"seconds": round(time.time() - t0, 1), "parameters": params}


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def default_cache() -> Path:
    env = os.environ.get("MEDSYNTH_REAL_SHAPED_DIR")
    return Path(env) if env else Path(tempfile.gettempdir())


def ensure(kind: str = "hunyuan-dit", cache: Path | str | None = None, seed: int = 0) -> Path:
    """The directory of the real-shaped ``kind`` (only 'hunyuan-dit'), built on first use."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
    cache = Path(cache) if cache else default_cache()
    final = cache / f"medsynth-real-shaped-hunyuan-v{FORMAT}" / f"HunyuanDiT-v1.2-Diffusers-s{seed}"
    if (final / INFO).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by tests and benches
    try:
        rec = _build(tmp, seed)
        rec.update(format=FORMAT, kind=kind, bytes=_dir_bytes(tmp))
        _write_json(tmp / INFO, rec)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INFO).is_file():  # another process won the race with the same files
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def info(root: Path | str) -> dict:
    """What the build of ``root`` recorded (seconds, bytes on disk, parameters)."""
    return json.loads((Path(root) / INFO).read_text())


__all__ = ["FORMAT", "KINDS", "ensure", "info", "MODEL_INDEX", "TRANSFORMER_CONFIG", "BERT_CONFIG", "MT5_CONFIG",
           "SCHEDULER_CONFIG", "vae_config", "bert_vocab"]
