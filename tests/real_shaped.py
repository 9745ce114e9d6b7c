"""Real-shaped PixArt-alpha bases for tests and benches: real configs, full width, 1-2 layers, random weights.

API (all that callers need)::

    from real_shaped import ensure, KINDS          # tests/ (or bench/ with tests/ on sys.path)

    root = ensure("512")       # -> Path of a diffusers directory laid out like PixArt-alpha/PixArt-XL-2-512x512
    root = ensure("1024-MS")   # -> ... like PixArt-alpha/PixArt-XL-2-1024-MS (sample_size 128: micro-conditions)
    # use it as `model.base: <root>` (recipe) or with from_pretrained(root, subfolder=...)

``ensure(kind, cache=None)`` builds once and caches under ``cache`` (default ``$MEDSYNTH_REAL_SHAPED_DIR``,
else ``<system tmp>/medsynth-real-shaped-v<FORMAT>``); the cache directory name carries :data:`FORMAT`,
so a changed build never reuses old files. Builds go to a temporary directory renamed into place,
so concurrent callers (two test sessions, a bench) never see half-written files. ``info(root)``
returns what was built (seconds, bytes, parameter counts).

What a directory holds (the layout of the hub repos, see the constants below):

- ``model_index.json``: PixArtAlphaPipeline with transformer/text_encoder/tokenizer/vae/scheduler, the
  transformer listed under the legacy class name ``Transformer2DModel`` as the hub's file has it.
- ``transformer/``: config.json with the hub's PixArt-XL-2 values (legacy ``_class_name:
  "Transformer2DModel"``, Transformer2DModel-only keys included) but ``num_layers`` = 2; fp32 safetensors.
- ``text_encoder/``: T5EncoderModel with the T5 v1.1 XXL config (d_model 4096, d_ff 10240, 64 heads,
  gated-gelu, dropout_rate 0.1, vocab 32128) but ``num_layers`` = 1; bf16 safetensors in shards with
  an index, as the hub's sharded checkpoint (~0.65 GB on disk, 1.3 GB in fp32 memory).
- ``tokenizer/``: ONLY ``spiece.model`` (a sentencepiece unigram model trained here on generated
  medical-style sentences, T5's ids pad 0 / eos 1 / unk 2). The hub folder also has
  tokenizer_config.json and special_tokens_map.json; leaving them out makes loaders build the T5
  tokenizer from spiece.model alone, the hardest path.
- ``vae/``: the SD VAE architecture (block_out_channels [128, 256, 512, 512], layers_per_block 2,
  4 latent channels, scaling_factor 0.18215), random weights, fp32 safetensors.
- ``scheduler/scheduler_config.json``: the hub's DPMSolverMultistepScheduler config.

The 512 and 1024-MS bases share text_encoder/, tokenizer/, vae/ and scheduler/ (as the hub repos
do, content-wise): their files are symlinks into ``<cache>/common`` the way a Hugging Face cache
snapshot links into blobs. Weights are seeded; the same FORMAT gives the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

FORMAT = 1
KINDS = ("512", "1024-MS")
INFO = "real_shaped.json"
DIT_LAYERS = 2
T5_LAYERS = 1

# model_index.json of PixArt-alpha/PixArt-XL-2-512x512 and -1024-MS (same content).
MODEL_INDEX = {
    "_class_name": "PixArtAlphaPipeline",
    "_diffusers_version": "0.22.0.dev0",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# transformer/config.json of the hub repos, num_layers 28 -> DIT_LAYERS. The keys PixArtTransformer2DModel
# does not take (double_self_attention, only_cross_attention, ...) are the legacy Transformer2DModel's.
TRANSFORMER_CONFIG = {
    "_class_name": "Transformer2DModel",
    "_diffusers_version": "0.22.0.dev0",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "double_self_attention": False,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": DIT_LAYERS,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 64,
    "upcast_attention": False,
    "use_linear_projection": False,
}
SAMPLE_SIZE = {"512": 64, "1024-MS": 128}

# text_encoder/config.json: google/t5-v1_1-xxl's encoder, num_layers 24 -> T5_LAYERS.
T5_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": T5_LAYERS,
    "num_heads": 64,
    "num_layers": T5_LAYERS,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 32128,
}

# vae/config.json: the SD VAE (stabilityai/sd-vae-ft-ema) that PixArt-alpha uses.
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def scheduler_config() -> dict:
    """scheduler/scheduler_config.json of the hub repos (medsynth keeps a copy for the tiny base)."""
    from medsynth.models.tiny import PIXART_SCHEDULER

    return dict(PIXART_SCHEDULER)


# ----------------------------------------------------------------------------- tokenizer corpus

_FINDINGS = ["polyp", "ulcer", "nevus", "melanoma", "keratosis", "lesion", "adenoma", "erosion", "angioma",
             "dermatofibroma", "carcinoma", "inflammation", "stool residue", "normal cecum", "z-line"]
_COLOURS = ["red", "pink", "brown", "dark brown", "light brown", "purple", "white", "yellow", "blue-gray", "tan"]
_SHAPES = ["round", "oval", "irregular", "flat", "raised", "elongated", "symmetric", "asymmetric"]
_BORDERS = ["well-defined", "ill-defined", "smooth", "jagged", "blurred", "notched", "sharp"]
_TEXTURES = ["smooth", "rough", "scaly", "glossy", "granular", "ulcerated", "velvety", "mottled"]
_MODALITIES = ["dermoscopic", "endoscopic", "colonoscopy", "histology", "clinical"]
_PLACES = ["in the centre", "at the edge", "near the border", "on the mucosal wall", "on the surface of the skin"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` medical-style caption sentences, seeded (the tokenizer's training text)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        f, c, s, b, t = (rng.choice(x) for x in (_FINDINGS, _COLOURS, _SHAPES, _BORDERS, _TEXTURES))
        m, p = rng.choice(_MODALITIES), rng.choice(_PLACES)
        forms = [
            f"A {m} image of a {f}.",
            f"The {f} is {c} and {s} with {b} borders and a {t} texture.",
            f"A {s} {c} {f} {p}, {rng.randint(2, 40)} mm wide.",
            f"This {m} image shows a {t}, {c} {f} with {b} margins {p}.",
        ]
        out.append(forms[i % len(forms)])
    return out


def train_spiece(path: Path, vocab_size: int = 800, seed: int = 0) -> None:
    """Train a sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos) into ``path``."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed=seed)), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------- build


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _build_common(out: Path, seed: int) -> dict:
    """text_encoder/, tokenizer/, vae/, scheduler/ (shared by both kinds)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from transformers import T5Config, T5EncoderModel

    t0 = time.time()
    (out / "tokenizer").mkdir(parents=True)
    train_spiece(out / "tokenizer" / "spiece.model", seed=seed)

    torch.manual_seed(seed + 1)
    te = T5EncoderModel(T5Config(**{k: v for k, v in T5_CONFIG.items() if k != "architectures"}))
    n_te = sum(p.numel() for p in te.parameters())
    te = te.to(torch.bfloat16)
    # Sharded with an index like the hub's model-0000x-of-0000y.safetensors.
    te.save_pretrained(str(out / "text_encoder"), safe_serialization=True, max_shard_size="300MB")
    del te

    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in VAE_CONFIG.items()})
    n_vae = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    del vae
    DPMSolverMultistepScheduler(**scheduler_config()).save_pretrained(str(out / "scheduler"))
    return {"seconds": round(time.time() - t0, 1), "parameters": {"text_encoder": n_te, "vae": n_vae}}


def _build_kind(kind: str, out: Path, common: Path, seed: int) -> dict:
    """model_index.json + transformer/ of ``kind``; the other parts linked to ``common``."""
    import torch
    from diffusers import PixArtTransformer2DModel

    t0 = time.time()
    cfg = dict(TRANSFORMER_CONFIG, sample_size=SAMPLE_SIZE[kind])
    torch.manual_seed(seed + 3 + KINDS.index(kind))
    # from_config drops the legacy-only keys; the saved config is then replaced by the hub's text.
    tr = PixArtTransformer2DModel.from_config(cfg)
    n_tr = sum(p.numel() for p in tr.parameters())
    tr.save_pretrained(str(out / "transformer"), safe_serialization=True)
    del tr
    (out / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        (out / part).mkdir()
        for f in sorted((common / part).iterdir()):
            (out / part / f.name).symlink_to(os.path.relpath(f, out / part))
    return {"seconds": round(time.time() - t0, 1), "parameters": {"transformer": n_tr}}


def default_cache() -> Path:
    env = os.environ.get("MEDSYNTH_REAL_SHAPED_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"medsynth-real-shaped-v{FORMAT}"


def _atomic_build(final: Path, build) -> None:
    if (final / INFO).is_file():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared (tests, benches)
    try:
        info = build(tmp)
        info.update(format=FORMAT, bytes=_dir_bytes(tmp))
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INFO).is_file():  # another process may have won the race with the same files
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure(kind: str, cache: Path | str | None = None, seed: int = 0) -> Path:
    """The directory of the real-shaped ``kind`` ('512' or '1024-MS'), built on first use."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
    cache = Path(cache) if cache else default_cache()
    common = cache / f"common-s{seed}"
    _atomic_build(common, lambda d: _build_common(d, seed))
    final = cache / f"PixArt-XL-2-{'512x512' if kind == '512' else kind}-s{seed}"
    _atomic_build(final, lambda d: _build_kind(kind, d, common, seed))
    return final


def info(root: Path | str) -> dict:
    """What the build of ``root`` recorded (seconds, bytes on disk excluding symlinks, parameters)."""
    return json.loads((Path(root) / INFO).read_text())


__all__ = ["FORMAT", "KINDS", "ensure", "info", "corpus", "train_spiece", "MODEL_INDEX", "TRANSFORMER_CONFIG",
           "T5_CONFIG", "VAE_CONFIG", "scheduler_config"]
