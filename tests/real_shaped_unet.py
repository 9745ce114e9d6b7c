"""Real-shaped Stable Diffusion 1.5 and SDXL bases for tests: hub layout and configs at full width, the depth
cut, seeded random weights.

API (as tests/real_shaped.py)::

    from real_shaped_unet import ensure, info, KINDS   # KINDS = ("sd15", "sdxl")

    root = ensure("sd15")   # laid out like stable-diffusion-v1-5/stable-diffusion-v1-5
    root = ensure("sdxl")   # laid out like stabilityai/stable-diffusion-xl-base-1.0

``ensure(kind, cache=None)`` builds once into ``cache`` (default ``$MEDSYNTH_REAL_SHAPED_DIR``, else
``<system tmp>/medsynth-real-shaped-v<real_shaped.FORMAT>``) under a name that carries :data:`FORMAT`,
through a temporary directory renamed into place (real_shaped._atomic_build).

What a directory holds:

- ``model_index.json``: the hub's text. SD 1.5 lists ``safety_checker`` (StableDiffusionSafetyChecker) and
  ``feature_extractor`` (CLIPImageProcessor). ``feature_extractor/preprocessor_config.json`` is here (a
  few hundred bytes, the hub's); ``safety_checker/`` is NOT (on the hub it is a 1.2 GB CLIP ViT-L vision
  model): medsynth never loads either, and the tests show it loads the base without them. A stock
  ``StableDiffusionPipeline.from_pretrained(root, safety_checker=None)`` loads it as it loads the hub's.
- ``unet/``: the hub's UNet2DConditionModel config.json text (SD 1.5 as written by diffusers 0.6, with
  ``attention_head_dim: 8`` meaning 8 heads; SDXL with text_time, 2816, per-level heads [5, 10, 20]) at full
  width, ``layers_per_block`` 2 -> 1 and SDXL's ``transformer_layers_per_block`` [1, 2, 10] -> 1; weights in
  fp16 under the main file name (the hub's main files are fp32 with an ``.fp16`` variant: fp16 halves the
  disk and makes every load an fp16 -> fp32 upcast).
- ``text_encoder/``: CLIP ViT-L/14's text tower (768, 12 heads, 3072, quick_gelu, vocab 49408, 77
  positions, the hub's bos 0 / eos 2 / pad 1, so transformers pools at argmax(input_ids) as for the real
  weights) with 2 layers instead of 12: SDXL conditions on hidden_states[-2], which with one layer would be
  the embeddings. SD 1.5 and SDXL both use this encoder: one weight file, linked into both, under each hub's
  config.json text (transformers 4.x's ``torch_dtype`` key, no ``dtype``).
  SDXL's ``text_encoder_2/``: OpenCLIP bigG's text tower as CLIPTextModelWithProjection (1280, 20 heads,
  5120, gelu, projection_dim 1280) with 2 layers instead of 32. fp16 safetensors.
- ``tokenizer/`` (and SDXL's ``tokenizer_2/``): vocab.json + merges.txt of a CLIP byte-level BPE learned
  offline by medsynth's own builder (sd.build_clip_tokenizer; about 2000 tokens, not 49408: ids stay below
  the embedding size, and the special tokens get the two highest ids, as in CLIP), plus the hub's
  tokenizer_config.json / special_tokens_map.json (pad ``<|endoftext|>``; tokenizer_2 pads with ``!``),
  model_max_length 77. No tokenizer.json, as on the hub: loaders convert the slow files.
- ``vae/``: the SD VAE architecture (128/256/512/512, 2 layers per block), seeded random weights (fp16,
  one file linked into both kinds), with each hub's config: SD 1.5 sample 512 and no ``scaling_factor`` key
  (the default 0.18215 applies); SDXL
  scaling 0.13025, sample 1024, ``force_upcast`` true.
- ``scheduler/scheduler_config.json``: the hub's text (SD 1.5 PNDM without ``prediction_type``, as on the
  hub; SDXL EulerDiscrete, "leading" spacing).

Which values are checked: model_index.json, unet/, vae/, scheduler/, text_encoder(_2)/ configs,
feature_extractor/ and SDXL's tokenizer files were compared key by key with copies of the hub repos' files kept
in a public repository (configs/models_config/ of filliptm/ComfyUI_FL-Trainer), and agree with medsynth's own
constants (sd.SD_SCHEDULER, sdxl.SDXL_SCHEDULER). SD 1.5's tokenizer_config.json / special_tokens_map.json follow
openai/clip-vit-large-patch14's files (checked the same way); their ``name_or_path`` value is from memory.
The depth cuts (``layers_per_block``, ``transformer_layers_per_block``, ``num_hidden_layers``) are the only
changed values.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import real_shaped

FORMAT = 3  # 3: sd.build_clip_tokenizer learns its merges deterministically
KINDS = ("sd15", "sdxl")
INFO = real_shaped.INFO
CLIP_LAYERS = 2
HUB_DIR = {"sd15": "stable-diffusion-v1-5", "sdxl": "stable-diffusion-xl-base-1.0"}

MODEL_INDEX = {
    "sd15": {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "sdxl": {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
}

UNET_CONFIG = {
    # unet/config.json of stable-diffusion-v1-5 (diffusers 0.6.0 wrote it: no later keys), layers_per_block 2 -> 1.
    "sd15": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    # unet/config.json of stable-diffusion-xl-base-1.0: layers_per_block 2 -> 1,
    # transformer_layers_per_block [1, 2, 10] -> 1.
    "sdxl": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": 1,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    },
}

# text_encoder/config.json of both (openai/clip-vit-large-patch14's text tower), 12 layers -> CLIP_LAYERS. The
# files differ only in what wrote them: see TEXT_ENCODER_CONFIG.
CLIP_L_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": CLIP_LAYERS,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# text_encoder_2/config.json of SDXL base (laion CLIP-ViT-bigG-14's text tower), 32 layers -> CLIP_LAYERS.
CLIP_G_CONFIG = {
    **CLIP_L_CONFIG,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "projection_dim": 1280,
}
TEXT_ENCODER_CONFIG = {
    "sd15": {"text_encoder": {"_name_or_path": "openai/clip-vit-large-patch14", **CLIP_L_CONFIG,
                              "torch_dtype": "float32", "transformers_version": "4.22.0.dev0"}},
    "sdxl": {"text_encoder": {**CLIP_L_CONFIG, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0"},
             "text_encoder_2": {**CLIP_G_CONFIG, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0"}},
}

_SPECIAL = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
            "__type": "AddedToken"}


def _added(text: str) -> dict:
    return {**_SPECIAL, "content": text}


def tokenizer_config(kind: str, pad: str) -> dict:
    """tokenizer/tokenizer_config.json of the hub repos: SD 1.5 keeps openai/clip-vit-large-patch14's file, SDXL
    has a later one (clean_up_tokenization_spaces, no name_or_path); pad '<|endoftext|>', SDXL's tokenizer_2 '!'."""
    cfg = {
        "add_prefix_space": False,
        "bos_token": _added("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": _added("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added("<|endoftext|>"),
    }
    if kind == "sd15":
        return {**cfg, "name_or_path": "openai/clip-vit-large-patch14",
                "special_tokens_map_file": "./special_tokens_map.json"}
    return {**cfg, "clean_up_tokenization_spaces": True}


def special_tokens_map(pad: str) -> dict:
    plain = {k: v for k, v in _SPECIAL.items() if k != "__type"}
    return {"bos_token": {**plain, "content": "<|startoftext|>"}, "eos_token": {**plain, "content": "<|endoftext|>"},
            "pad_token": pad, "unk_token": {**plain, "content": "<|endoftext|>"}}


_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_CONFIG = {
    # No scaling_factor key: diffusers 0.6 had none, and the loader's default (0.18215) applies, as for the hub's file.
    "sd15": {**_VAE, "_diffusers_version": "0.6.0", "sample_size": 512},
    "sdxl": {**_VAE, "_diffusers_version": "0.20.0.dev0", "_name_or_path": "../sdxl-vae/", "force_upcast": True,
             "sample_size": 1024, "scaling_factor": 0.13025},
}

SCHEDULER_CONFIG = {
    "sd15": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
}

# feature_extractor/preprocessor_config.json of stable-diffusion-v1-5 (the safety checker's image processor).
FEATURE_EXTRACTOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _clip_tokenizer():
    """medsynth's offline CLIP BPE builder on the demo recipe's texts plus real_shaped's medical corpus."""
    import tempfile

    from medsynth.models.sd import build_clip_tokenizer
    from medsynth.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:  # an empty workdir: the builder then reads only the recipe
        recipe = load_recipe("demo", [f"workdir={tmp}", "modality=endoscopic", "model.tiny.vocab_size=2000",
                                      "visual_features=" + " ".join(real_shaped.corpus(60))])
        return build_clip_tokenizer(recipe)


def _build_common(out: Path, seed: int) -> dict:
    """tokenizer files, CLIP-L text encoder and VAE weights that both kinds link to."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.time()
    tok = _clip_tokenizer()
    # The slow tokenizer's two files, as the hub has them (no tokenizer.json); each kind adds its own
    # tokenizer_config.json / special_tokens_map.json.
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    (out / "tokenizer").mkdir(parents=True)
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    torch.manual_seed(seed + 1)
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in CLIP_L_CONFIG.items() if k != "architectures"}))
    n_te = _count(te)
    te.to(torch.float16).save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    del te
    (out / "text_encoder" / "config.json").unlink()  # each kind writes its hub's text

    torch.manual_seed(seed + 2)
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _VAE.items() if k != "_class_name"}
    vae = AutoencoderKL(**cfg)
    n_vae = _count(vae)
    vae.to(torch.float16).save_pretrained(str(out / "vae"), safe_serialization=True)
    del vae
    (out / "vae" / "config.json").unlink()
    return {"seconds": round(time.time() - t0, 1), "tokenizer_vocab": len(tok),
            "parameters": {"text_encoder": n_te, "vae": n_vae}}


def _link_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        (dst / f.name).symlink_to(os.path.relpath(f, dst))


def _build_kind(kind: str, out: Path, common: Path, seed: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    t0 = time.time()
    params = {}
    cfg = UNET_CONFIG[kind]
    torch.manual_seed(seed + 3 + KINDS.index(kind))
    unet = UNet2DConditionModel.from_config(cfg)
    params["unet"] = _count(unet)
    unet.to(torch.float16).save_pretrained(str(out / "unet"), safe_serialization=True)
    del unet
    _write_json(out / "unet" / "config.json", cfg)  # the hub's text, not the keys this diffusers writes

    _link_dir(common / "text_encoder", out / "text_encoder")
    _link_dir(common / "vae", out / "vae")
    _write_json(out / "vae" / "config.json", VAE_CONFIG[kind])
    _write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG[kind])
    toks = {"tokenizer": "<|endoftext|>"} if kind == "sd15" else {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    for part, pad in toks.items():
        _link_dir(common / "tokenizer", out / part)
        _write_json(out / part / "tokenizer_config.json", tokenizer_config(kind, pad))
        _write_json(out / part / "special_tokens_map.json", special_tokens_map(pad))
    if kind == "sd15":
        _write_json(out / "feature_extractor" / "preprocessor_config.json", FEATURE_EXTRACTOR)
    else:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        torch.manual_seed(seed + 10)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in CLIP_G_CONFIG.items()
                                                            if k != "architectures"}))
        params["text_encoder_2"] = _count(te2)
        te2.to(torch.float16).save_pretrained(str(out / "text_encoder_2"), safe_serialization=True)
        del te2
    for part, cfg in TEXT_ENCODER_CONFIG[kind].items():
        _write_json(out / part / "config.json", cfg)
    _write_json(out / "model_index.json", MODEL_INDEX[kind])
    return {"seconds": round(time.time() - t0, 1), "parameters": params, "unet_format": FORMAT}


def default_cache() -> Path:
    return real_shaped.default_cache()


def ensure(kind: str, cache: Path | str | None = None, seed: int = 0) -> Path:
    """The directory of the real-shaped ``kind`` ('sd15' or 'sdxl'), built on first use."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
    cache = Path(cache) if cache else default_cache()
    common = cache / f"unet-common-v{FORMAT}-s{seed}"
    real_shaped._atomic_build(common, lambda d: _build_common(d, seed))
    final = cache / f"{HUB_DIR[kind]}-v{FORMAT}-s{seed}"
    real_shaped._atomic_build(final, lambda d: _build_kind(kind, d, common, seed))
    return final


def info(root: Path | str) -> dict:
    """What the build of ``root`` recorded (seconds, bytes on disk excluding symlinks, parameters)."""
    return real_shaped.info(root)


__all__ = ["FORMAT", "KINDS", "ensure", "info", "MODEL_INDEX", "UNET_CONFIG", "CLIP_L_CONFIG", "CLIP_G_CONFIG",
           "VAE_CONFIG", "SCHEDULER_CONFIG", "FEATURE_EXTRACTOR", "tokenizer_config", "special_tokens_map"]
