"""Recipes: one YAML file = one data set + one experiment, typed and validated.

The schema is a tree of dataclasses. Every field carries a one-line ``help`` text (the
reference in docs/recipes.md is generated from it), and optional ``choices``/bounds.
The validator is hand-written rather than pydantic because we want every problem of a
recipe reported at once, each naming the file (or ``--set``), the dotted key, the bad
value and the fix, with did-you-mean suggestions, and we never coerce values silently
(pydantic's lax mode turns "5" into 5 and "yes" into True).

Relative paths in a recipe are taken relative to the current directory, like every
other path on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError, UserError

BUILTIN_DIRS = (
    Path(__file__).resolve().parent / "recipes",  # installed wheel (force-included)
    Path(__file__).resolve().parent.parent / "recipes",  # source checkout / editable install
)

CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def F(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, choices=None,
      min=None, max=None, gt=None, lt=None, why=None):
    """A schema field: default, one-line help, optional choices / bounds, and why the bounds are what they are."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "gt": gt, "lt": lt, "why": why}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- schema


@dataclass
class ClassSpec:
    name: str = F(help="class id: used in file names, sample keys and `counts` (letters, digits, '-', '_')")
    category: str | None = F(None, help="category text used in prompts (default: name with '-'/'_' as spaces)")
    folder: str | None = F(None, help="sub-folder of data.root holding this class (default: name)")

    def resolved_category(self) -> str:
        return self.category if self.category else self.name.replace("-", " ").replace("_", " ")

    def resolved_folder(self) -> str:
        return self.folder if self.folder else self.name


@dataclass
class DataConfig:
    root: str | None = F(None, help="image folder with one sub-folder per class (or null when data.manifest is given)")
    manifest: str | None = F(None, help="CSV with columns path,label[,split] instead of a class-folder tree; paths relative to the CSV")
    test_fraction: float = F(0.2, help="fraction of each class held out as the real test split", gt=0.0, max=0.5,
                             why="more would hold out more test than train images (the paper holds out 0.2)")
    on_bad_image: str = F("error", help="an image that does not decode: 'error' lists them all and stops, 'skip' leaves them out and records them", choices=["error", "skip"])
    extensions: list[str] = F(factory=lambda: [".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm"],
                              help="file endings (case-insensitive) taken as images when scanning data.root")
    min_per_class: int = F(2, help="a class with fewer usable images is an error (needs at least one train and one test image)", min=2)
    group_by: str | None = F(None, help="column holding a group id (patient, lesion, video) in data.manifest, or in groups.csv "
                             "(path,<column>) beside a class-folder tree; no group is split between train and test")


@dataclass
class TinyConfig:
    layers: int = F(4, help="DiT blocks of the tiny transformer", min=1)
    heads: int = F(4, help="attention heads of the tiny transformer", min=1)
    head_dim: int = F(16, help="width of one attention head of the tiny transformer", min=4)
    text_layers: int = F(2, help="encoder layers of the tiny T5", min=1)
    text_dim: int = F(64, help="hidden size of the tiny T5", min=8)
    vocab_size: int = F(1000, help="vocabulary size of the tiny T5 tokenizer (trained offline on the class texts)", min=100)
    vae_channels: list[int] = F(factory=lambda: [16, 32, 32], help="channels per level of the tiny VAE (downsampling = 2^(levels-1): 3 levels = x4, 16x16 latents at 64 px)")
    latent_channels: int = F(4, help="latent channels of the tiny VAE", min=1)
    autoencoder: str = F("fitted", help="autoencoder of the tiny base: 'fitted' (a small KL VAE fitted to the training images) or "
                         "'taef2' (the pretrained TAEF2 tiny autoencoder shipped with medsynth, 32 latent channels at 1/8 size)",
                         choices=["fitted", "taef2"])
    vae_fit_steps: int = F(600, help="optimizer steps fitting the tiny VAE to the training images (cached per data set)", min=0)
    vae_fit_batch: int = F(16, help="batch size when fitting the tiny VAE", min=1)
    vae_fit_crop: int = F(32, help="square random crop (pixels) the tiny VAE is fitted on, 0 = whole images; crops make the fit ~4x cheaper", min=0)
    prediction_type: str = F("v_prediction", help="what the tiny DiT learns to predict: 'v_prediction' (default; a small model trained from scratch "
                             "learns image content and class conditioning far faster) or 'epsilon' (as PixArt-alpha itself)", choices=["v_prediction", "epsilon"])


@dataclass
class ModelConfig:
    base: str = F("PixArt-alpha/PixArt-XL-2-512x512", help="base model (any family of model.family): Hugging Face id, local diffusers directory, or 'tiny' (built in code, no download)")
    family: str | None = F(None, help="backbone family; null = read from the base's model_index.json (_class_name), 'pixart' for 'tiny'",
                           choices=["pixart", "sd", "sdxl", "hunyuan-dit", "dit", "sana"])
    revision: str | None = F(None, help="Hub revision (branch, tag or commit) of model.base")
    resolution: int = F(512, help="training and generation size in pixels (square)", min=16)
    dtype: str = F("bf16", help="weights dtype for inference stages", choices=["bf16", "fp16", "fp32"])
    device: str = F("auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    max_text_tokens: int = F(120, help="T5 token limit of the base model (PixArt-alpha: 120)", min=8)
    tiny: TinyConfig = F(factory=TinyConfig, help="architecture of the 'tiny' base (ignored for real bases)")


CAPTION_PROMPT = (
    "{Article} {modality} image of {category}. Please describe the {modality} image of {category} "
    "using the following visual features: {visual_features}. Start with '{Article} {modality} image of "
    "{category}' and ensure the description does not exceed 100 words."
)


@dataclass
class CaptionConfig:
    source: str = F("vlm", help="where captions come from: a VLM, the class template, empty text, a user file, or measured image statistics", choices=["vlm", "simple", "empty", "file", "stats"])
    model: str = F("llava-hf/llama3-llava-next-8b-hf", help="image-text-to-text model (HF id or local dir) for source 'vlm'")
    revision: str | None = F(None, help="Hub revision of caption.model")
    file: str | None = F(None, help="CSV or JSONL with path,caption for source 'file'")
    prompt: str = F(CAPTION_PROMPT, help="VLM prompt; placeholders {Article} {article} {modality} {category} {visual_features}")
    splits: str = F("train", help="caption the train split only (paper) or every image", choices=["train", "all"])
    batch_size: int = F(4, help="images per VLM generate() call", min=1)
    do_sample: bool = F(True, help="sample (paper) instead of greedy decoding")
    temperature: float = F(0.8, help="sampling temperature", gt=0.0)
    top_k: int = F(50, help="top-k sampling", min=0)
    top_p: float = F(0.9, help="nucleus sampling", gt=0.0, max=1.0)
    max_new_tokens: int = F(150, help="generation length limit", min=1)
    prefix_retries: int = F(2, help="regenerations of a caption lacking the required prefix before the prefix is prepended", min=0)
    simplify_model: str = F("google-t5/t5-base", help="seq2seq model (HF id or local dir) prompted 'simplify: {text}' for captions over the token limit")
    simplify_retries: int = F(2, help="simplification attempts before cutting at a sentence boundary", min=0)
    dtype: str = F("bf16", help="dtype of the VLM and simplifier", choices=["bf16", "fp16", "fp32"])
    device: str = F("auto", help="device of the VLM and simplifier ('auto', 'cpu', 'cuda', ...)")
    trust_remote_code: bool = F(False, help="allow the caption model's own Python code (needed by e.g. Ovis); off unless you trust the repo")


@dataclass
class LoraConfig:
    rank: int = F(8, help="LoRA rank r", min=1)
    alpha: float = F(8.0, help="LoRA alpha (scale = alpha / r)", gt=0.0)
    dropout: float = F(0.0, help="LoRA dropout", min=0.0, lt=1.0)
    init: str = F("default", help="LoRA init: peft default (Kaiming A, zero B) or gaussian", choices=["default", "gaussian"])
    dora: bool = F(False, help="weight-decomposed LoRA (DoRA; the paper's ablation)")
    transformer_targets: str = F("paper", help="DiT modules: 'paper' (official list incl. embedders, adaLN, projections) or 'attn_ff' (attention + feed-forward)", choices=["paper", "attn_ff"])
    text_encoder: bool = F(True, help="LoRA on the T5 text encoder too (false = the paper's 'w/o LoRA on T5' ablation)")
    text_encoder_targets: str = F("full", help="T5 modules: 'full' (q,k,v,o,wi_0,wi_1,wo) or 'paper_parity' (official list, whose 'wi' matches nothing in T5 v1.1)", choices=["full", "paper_parity"])


@dataclass
class HldfConfig:
    enabled: bool = F(True, help="add the HLDF pixel-space colour loss")
    every_n_steps: int = F(500, help="apply the colour loss every N optimizer steps (paper: 500 Kvasir, 1500 skin)", min=1)
    steps: int = F(20, help="M: DPM-Solver++ steps of the differentiable sampler", min=1)
    weight: float | None = F(None, help="colour loss weight (null = 1/M, as in the paper)", min=0.0)
    guidance: float = F(4.5, help="classifier-free guidance scale while sampling for HLDF", min=0.0)
    start: str = F("noise", help="sample from pure noise (paper) or from noised real latents", choices=["noise", "noised_real"])
    start_strength: float = F(0.6, help="with start=noised_real: fraction of the schedule to noise (1 = pure noise)", gt=0.0, max=1.0)
    grad_last_k: int | None = F(None, help="backpropagate through the last K solver steps only (null = all M), to bound memory", min=1)
    seed: int | None = F(None, help="seed of the HLDF noise generator (null = recipe seed)")
    channel_reduction: str = F("mean", help="how the colour loss combines the 3 RGB channels: 'mean' (the official code) or 'sum' "
                               "(the paper's Eq. 4; 3x the weight)", choices=["mean", "sum"])


@dataclass
class FinetuneConfig:
    epochs: int = F(10, help="passes over the train split (ignored when max_steps is set)", min=1)
    max_steps: int | None = F(None, help="optimizer steps to train (overrides epochs)", min=1)
    batch_size: int = F(1, help="images per device per micro-batch", min=1)
    gradient_accumulation_steps: int = F(1, help="micro-batches per optimizer step", min=1)
    learning_rate: float = F(1e-4, help="AdamW learning rate", gt=0.0)
    lr_scheduler: str = F("constant", help="learning-rate schedule after warmup", choices=["constant", "cosine"])
    warmup_steps: int = F(0, help="linear warmup steps", min=0)
    weight_decay: float = F(0.01, help="AdamW weight decay", min=0.0)
    optimizer: str = F("auto", help="'adamw', 'adamw8bit' (bitsandbytes), or 'auto' (8-bit when bitsandbytes is installed and on CUDA)", choices=["auto", "adamw", "adamw8bit"])
    mixed_precision: str = F("bf16", help="autocast precision; adapter master weights stay fp32", choices=["bf16", "fp16", "no"])
    grad_clip: float = F(1.0, help="max gradient norm", gt=0.0)
    gradient_checkpointing: bool = F(True, help="recompute DiT and T5 activations in backward to save memory")
    caption_dropout: float = F(0.0, help="probability of replacing a caption by the empty prompt", min=0.0, max=1.0)
    label_dropout: float | None = F(None, help="class-conditional families (dit): probability of replacing a training label by the null "
                                    "class, for classifier-free guidance; null = finetune.caption_dropout; an error for text families",
                                    min=0.0, max=1.0)
    ema_decay: float | None = F(None, help="decay of the weight EMA that is the final model of families trained from scratch (dit); "
                                "null = the family's default (dit: 0.9999); an error for families without an EMA", min=0.0, lt=1.0)
    base_dropout: bool = F(False, help="keep the dropout of the frozen base modules active while training (T5 v1.1 has dropout_rate 0.1); "
                           "false = frozen modules run in eval mode (they compute what they compute at inference) and only LoRA dropout applies")
    augment: str = F("none", help="training augmentation ('hflip' disables the latent cache)", choices=["none", "hflip"])
    cache_latents: bool = F(True, help="encode every training image with the VAE once (when augmentation allows)")
    cache_text: bool = F(True, help="encode every caption with T5 once (when T5 is frozen)")
    adapter: str = F("lora", help="'lora' (pretrained bases) or 'full' (train every DiT weight; for the tiny base)", choices=["lora", "full"])
    lora: LoraConfig = F(factory=LoraConfig, help="LoRA settings")
    hldf: HldfConfig = F(factory=HldfConfig, help="Hybrid-Level Diffusion Fine-tuning (colour loss)")
    checkpoint_every: int = F(500, help="save a resumable checkpoint every K optimizer steps", min=1)
    keep_checkpoints: int = F(3, help="keep the last N checkpoints", min=1)
    sample_every: int = F(500, help="write a per-class sample grid every V optimizer steps", min=1)
    samples_per_class: int = F(2, help="images per class in each sample grid (fixed seeds)", min=1)
    log_every: int = F(10, help="write log.jsonl / TensorBoard every L optimizer steps", min=1)


@dataclass
class CurateConfig:
    enabled: bool = F(False, help="generate more candidates than needed and keep the ones a judge classifier finds most typical of their class")
    oversample: float = F(2.0, help="candidates generated per kept image (x the target count of each class)", min=1.0)
    judge: str = F("real", help="judge classifier: 'real' = the workspace's real-only classifier (classify/real/, trained on the real "
                   "train split only; trained first when missing), or the path of a medsynth classify output directory")
    min_score: float = F(0.0, help="drop candidates whose judge probability for their intended class is below this", min=0.0, max=1.0)
    min_distance: float = F(0.05, help="drop candidates whose cosine distance to the nearest real train image (judge features) is below "
                            "this (near-copies); 0 disables", min=0.0, max=2.0)


@dataclass
class SynthesizeConfig:
    per_class: int | None = F(None, help="images per class (uniform); the default plan is 100 per class when no balance key is set", min=0)
    counts: dict[str, int] | None = F(None, help="images per class by class name")
    match_real: int | None = F(None, help="total images, split in the proportions of the real train split", min=1)
    topup: int | None = F(None, help="bring every class up to N images counting its real train images", min=0)
    prompt_source: str = F("captions", help="prompts: captions of real train images of the class (paper), the class template, or a file", choices=["captions", "simple", "file"])
    prompt_file: str | None = F(None, help="with prompt_source=file: text file with 'class<TAB>prompt' lines")
    negative_prompt: str = F("", help="negative prompt for classifier-free guidance")
    steps: int = F(20, help="DPM-Solver++ steps", min=1)
    guidance: float = F(4.5, help="classifier-free guidance scale", min=0.0)
    batch_size: int = F(8, help="images per denoising batch", min=1)
    format: str = F("webdataset", help="output format", choices=["webdataset", "imagefolder"])
    image_format: str = F("png", help="image encoding inside shards / folders", choices=["png", "jpg"])
    jpg_quality: int = F(95, help="JPEG quality with image_format=jpg", min=1, max=100)
    shard_size: int = F(1000, help="samples per WebDataset shard", min=1)
    grid_per_class: int = F(8, help="images per class in the sample grid PNG", min=0)
    curate: CurateConfig = F(factory=CurateConfig, help="curation of generated candidates by a judge classifier")
    license: str | None = F(None, help="licence note for the synthetic set's dataset card (e.g. inherited from the real data: 'CC BY-NC 4.0')")


@dataclass
class ClassifyConfig:
    model: str = F("vit_base_patch16_224", help="timm model name (paper: ViT-B/16)")
    pretrained: bool = F(True, help="start from pretrained weights (timm/HF cache or classify.pretrained_path)")
    pretrained_path: str | None = F(None, help="local weights file (.safetensors/.pth/.bin) for classify.model")
    train_on: str = F("synthetic", help="training data: synthetic shards, the real train split, or both", choices=["synthetic", "real", "mixed"])
    epochs: int = F(5, help="training epochs (paper: 5)", min=1)
    learning_rate: float = F(2e-5, help="AdamW learning rate (paper: 2e-5)", gt=0.0)
    weight_decay: float = F(0.05, help="AdamW weight decay", min=0.0)
    batch_size: int = F(32, help="batch size", min=1)
    image_size: int = F(224, help="classifier input size", min=16)
    geometry: str = F("squash", help="how every image (real train, real test, synthetic) becomes a square classifier input: 'squash' "
                      "(resize the whole image; nothing is cut off) or 'crop' (shorter side resized, centre crop: the geometry the "
                      "generator is trained on)", choices=["squash", "crop"])
    mixed_precision: str = F("bf16", help="autocast precision on GPU", choices=["bf16", "fp16", "no"])
    device: str = F("auto", help="'auto', 'cpu', 'cuda', ...")
    num_workers: int = F(2, help="data-loader worker processes", min=0)


@dataclass
class ScoreConfig:
    fid: bool = F(True, help="compute FID (needs the FID Inception weights, see score.fid_weights)")
    fid_weights: str | None = F(None, help="path of pt_inception-2015-12-05 weights (or env MEDSYNTH_FID_WEIGHTS)")
    kid_subset_size: int = F(1000, help="KID subset size (min(this, n) is used)", min=2)
    kid_subsets: int = F(100, help="number of KID subsets", min=1)
    domain_model: str | None = F(None, help="domain feature extractor for domain FID: null = the real-only classifier of `classify --real-only`, a preset "
                                        "('kvasir-vit', 'ham10000-vit': public ViTs fine-tuned on those data sets), or a timm/HF model id")
    domain_pretrained_path: str | None = F(None, help="local weights for score.domain_model")
    memorization_threshold: float = F(0.95, help="cosine similarity above which a synthetic image counts as a near-copy of a real training image", gt=0.0, max=1.0)
    prdc_k: int = F(5, help="k of the k-nearest-neighbour balls for precision / recall / density / coverage", min=1)
    dinov2_model: str | None = F("vit_base_patch14_dinov2.lvd142m", help="timm DINOv2 model for FD_DINOv2, used only when its weights are "
                                 "in the local cache (never downloaded); null = skip FD_DINOv2")
    dinov2_pretrained_path: str | None = F(None, help="local weights file for score.dinov2_model (instead of the cache)")
    per_class: bool = F(True, help="also report FID/KID per class where class sizes allow")
    batch_size: int = F(32, help="feature-extraction batch size", min=1)
    device: str = F("auto", help="'auto', 'cpu', 'cuda', ...")


@dataclass
class Recipe:
    name: str | None = F(None, help="experiment name (default: the recipe file's name)")
    workdir: str | None = F(None, help="workspace directory for every stage's outputs (default: runs/<name>)")
    seed: int = F(0, help="master seed: splits, captions, training, synthesis, classifier")
    modality: str = F("medical", help="imaging modality used in prompts, e.g. 'dermoscopic', 'endoscopic'")
    visual_features: str = F("specific color, shape and texture", help="visual features the captioner is asked to describe")
    classes: list[ClassSpec] | None = F(None, help="classes in label order (null = the sub-folders of data.root, sorted)")
    data: DataConfig = F(factory=DataConfig, help="input data")
    model: ModelConfig = F(factory=ModelConfig, help="base text-to-image model")
    caption: CaptionConfig = F(factory=CaptionConfig, help="caption stage (Visual Symptom Generator)")
    finetune: FinetuneConfig = F(factory=FinetuneConfig, help="finetune stage (LoRA + HLDF)")
    synthesize: SynthesizeConfig = F(factory=SynthesizeConfig, help="synthesize stage")
    classify: ClassifyConfig = F(factory=ClassifyConfig, help="downstream classifier")
    score: ScoreConfig = F(factory=ScoreConfig, help="generative metrics")

    # Not schema fields: where this recipe came from (set by load_recipe).
    source: str = field(default="<defaults>", repr=False, compare=False, metadata={"internal": True})
    overrides: list[str] = field(default_factory=list, repr=False, compare=False, metadata={"internal": True})

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir if self.workdir else f"runs/{self.name or 'medsynth'}")

    def to_dict(self) -> dict:
        return to_dict(self)


# ----------------------------------------------------------------------------- helpers


def schema_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def to_dict(obj) -> Any:
    """Plain-data view of a schema object (internal fields left out)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in schema_fields(type(obj))}
    if isinstance(obj, list):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    tp, opt = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        name = "mapping"
    elif origin is list:
        name = f"list of {_type_name(typing.get_args(tp)[0])}"
    elif origin is dict:
        k, v = typing.get_args(tp)
        name = f"mapping of {_type_name(k)} to {_type_name(v)}"
    else:
        name = {int: "integer", float: "number", bool: "true/false", str: "string"}.get(tp, str(tp))
    return name + (" or null" if opt else "")


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]  # as written in YAML
    text = repr(value) if not isinstance(value, str) else f"'{value}'"
    return text if len(text) <= 80 else text[:77] + "..."


class _Ctx:
    """Collects problems; knows which keys came from --set."""

    def __init__(self, source: str, override_keys: set[str]):
        self.source = source
        self.override_keys = override_keys
        self.problems: list[str] = []

    def where(self, key: str) -> str:
        # A problem inside a value given by --set (e.g. --set 'synthesize.counts={a: -1}') is the --set's.
        if any(key == k or key.startswith((k + ".", k + "[")) for k in self.override_keys):
            return f"--set {key}"
        return f"{self.source}: {key}"

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")


def _build(cls, raw: Any, prefix: str, ctx: _Ctx):
    """Validate mapping ``raw`` against dataclass ``cls``; return an instance (or None on errors)."""
    if not isinstance(raw, dict):
        ctx.add(prefix or "<top level>", f"expected a mapping, got {_fmt(raw)}; write it as 'key: value' lines")
        return None
    fields = {f.name: f for f in schema_fields(cls)}
    hints = _hints(cls)
    ok = True
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}{key}"
            guess = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{prefix}{guess[0]}'?" if guess else f"known keys here: {', '.join(fields)}"
            ctx.add(dotted, f"unknown key; {hint}")
            ok = False
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        value, good = _convert(raw[name], hints[name], f, f"{prefix}{name}", ctx)
        ok = ok and good
        kwargs[name] = value
    if not ok:
        return None
    if cls is ClassSpec and "name" not in raw:
        ctx.add(prefix.rstrip("."), "a class needs a 'name'")
        return None
    return cls(**kwargs)


def _convert(value, tp, f: dataclasses.Field | None, key: str, ctx: _Ctx) -> tuple[Any, bool]:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None, True
        ctx.add(key, f"must not be null; give {_a(_type_name(tp))}")
        return None, False
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if tp is ClassSpec and isinstance(value, str):
            value = {"name": value}
        inst = _build(tp, value, key + ".", ctx)
        return inst, inst is not None
    if origin is list:
        if not isinstance(value, list):
            ctx.add(key, f"expected a list, got {_fmt(value)}; write [a, b] or one '- item' per line")
            return None, False
        (item_tp,) = typing.get_args(tp)
        out, ok = [], True
        for i, item in enumerate(value):
            v, good = _convert(item, item_tp, None, f"{key}[{i}]", ctx)
            ok = ok and good
            out.append(v)
        return out, ok
    if origin is dict:
        if not isinstance(value, dict):
            ctx.add(key, f"expected a mapping, got {_fmt(value)}; write {{name: value, ...}}")
            return None, False
        _, v_tp = typing.get_args(tp)
        out, ok = {}, True
        for k, v in value.items():
            cv, good = _convert(v, v_tp, f, f"{key}.{k}", ctx)
            ok = ok and good
            out[str(k)] = cv
        return out, ok
    # scalars
    good = True
    if tp is bool:
        good = isinstance(value, bool)
    elif tp is int:
        good = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; it is still the number the user wrote.
            try:
                value = float(value)
            except ValueError:
                good = False
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            good = False
        else:
            value = float(value)
    elif tp is str:
        good = isinstance(value, str)
    if not good:
        ctx.add(key, f"{_fmt(value)} is not {_a(_type_name(tp))}; give {_a(_type_name(tp))}")
        return None, False
    if f is not None:
        meta = f.metadata
        choices = meta.get("choices")
        if choices and value not in choices:
            guess = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            ctx.add(key, f"{_fmt(value)} is not one of {', '.join(choices)}{hint}")
            return None, False
        for bound, test, words in (
            ("min", lambda v, b: v >= b, "at least"),
            ("max", lambda v, b: v <= b, "at most"),
            ("gt", lambda v, b: v > b, "greater than"),
            ("lt", lambda v, b: v < b, "less than"),
        ):
            b = meta.get(bound)
            if b is not None and isinstance(value, (int, float)) and not test(value, b):
                why = f"; {meta['why']}" if meta.get("why") else ""
                ctx.add(key, f"{_fmt(value)} is out of range; it must be {words} {b}{why}")
                return None, False
    return value, True


def _cross_checks(r: Recipe, ctx: _Ctx) -> None:
    """Rules that involve more than one field."""
    if r.classes is not None:
        if not r.classes:
            ctx.add("classes", "is an empty list; list the classes or remove the key to use the sub-folders of data.root")
        seen: set[str] = set()
        for i, c in enumerate(r.classes):
            if not CLASS_NAME_RE.match(c.name):
                ctx.add(f"classes[{i}].name", f"{_fmt(c.name)} may only use letters, digits, '-' and '_' (it names files and sample keys); put free text in 'category'")
            if c.name in seen:
                ctx.add(f"classes[{i}].name", f"{_fmt(c.name)} is listed twice; give every class a unique name")
            seen.add(c.name)
    if r.data.root is not None and r.data.manifest is not None:
        ctx.add("data.manifest", "data.root and data.manifest are both set; keep one (set the other to null)")
    s = r.synthesize
    chosen = [k for k in ("per_class", "counts", "match_real", "topup") if getattr(s, k) is not None]
    if len(chosen) > 1:
        ctx.add(f"synthesize.{chosen[1]}", f"conflicts with synthesize.{chosen[0]}: choose one balance rule and set the others to null")
    if s.counts is not None:
        for k, v in s.counts.items():
            if v < 0:
                ctx.add(f"synthesize.counts.{k}", f"{v} is negative; a count must be 0 or more")
        if r.classes is not None:
            known = {c.name for c in r.classes}
            for k in s.counts:
                if k not in known:
                    guess = difflib.get_close_matches(k, sorted(known), n=1)
                    hint = f"did you mean '{guess[0]}'?" if guess else f"known classes: {', '.join(sorted(known))}"
                    ctx.add(f"synthesize.counts.{k}", f"unknown class; {hint}")
    if s.prompt_source == "file" and not s.prompt_file:
        ctx.add("synthesize.prompt_file", "is required with synthesize.prompt_source: file; give the path of a 'class<TAB>prompt' file")
    if r.caption.source == "file" and not r.caption.file:
        ctx.add("caption.file", "is required with caption.source: file; give a CSV/JSONL with path,caption")
    h = r.finetune.hldf
    if h.grad_last_k is not None and h.grad_last_k > h.steps:
        ctx.add("finetune.hldf.grad_last_k", f"{h.grad_last_k} exceeds finetune.hldf.steps ({h.steps}); use at most M or null")
    if any(c < 1 for c in r.model.tiny.vae_channels) or not r.model.tiny.vae_channels:
        ctx.add("model.tiny.vae_channels", "needs one or more positive channel counts")


# ----------------------------------------------------------------------------- loading


def builtin_names() -> list[str]:
    names: set[str] = set()
    for d in BUILTIN_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def builtin_path(name: str) -> Path | None:
    for d in BUILTIN_DIRS:
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    return None


def find_recipe_file(ref: str) -> Path:
    """A path, or the name of a built-in recipe."""
    p = Path(ref)
    if p.is_file():
        return p
    if not p.suffix and "/" not in ref:
        b = builtin_path(ref)
        if b is not None:
            return b
    known = builtin_names()
    guess = difflib.get_close_matches(ref, known, n=1)
    hint = f" Did you mean '{guess[0]}'?" if guess else ""
    raise UserError(
        f"recipe '{ref}' not found: it is neither a file nor a built-in recipe ({', '.join(known)}).{hint} "
        "Give a path to a YAML recipe or one of the built-in names (see `medsynth recipes list`)."
    )


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``--set a.b=value`` items; values are YAML scalars/lists/mappings."""
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set finetune.max_steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"--set {item!r}: the key before '=' is empty")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise UserError(f"--set {key}: the value {text!r} is not valid YAML ({e.__class__.__name__}); quote it") from None
        out.append((key, value))
    return out


def _apply_set(raw: dict, key: str, value: Any, ctx: _Ctx) -> None:
    parts = key.split(".")
    cls: Any = Recipe
    node = raw
    for i, part in enumerate(parts):
        fields = {f.name: f for f in schema_fields(cls)} if cls is not None else {}
        last = i == len(parts) - 1
        if cls is not None and part not in fields:
            here = ".".join(parts[:i])
            guess = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            full = (here + "." if here else "") + guess[0] if guess else None
            hint = f"did you mean '{full}'?" if full else f"known keys{' under ' + here if here else ''}: {', '.join(fields)}"
            ctx.problems.append(f"--set {key}: unknown key; {hint}")
            return
        if last:
            node[part] = value
            return
        tp = _unwrap_optional(_hints(cls)[part])[0] if cls is not None else None
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
        cls = tp if dataclasses.is_dataclass(tp) else None


def build_recipe(raw: Any, source: str = "<recipe>", overrides: list[str] | None = None,
                 default_name: str | None = None) -> Recipe:
    """Validate raw YAML data plus ``--set`` overrides; raise RecipeError listing every problem."""
    overrides = list(overrides or [])
    pairs = parse_set(overrides)
    ctx = _Ctx(source, {k for k, _ in pairs})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{source}: the file must hold a mapping of keys (name:, data:, model:, ...), not {type(raw).__name__}"], source)
    raw = _deepcopy(raw)
    for key, value in pairs:
        _apply_set(raw, key, value, ctx)
    recipe = _build(Recipe, raw, "", ctx)
    if recipe is not None:
        _cross_checks(recipe, ctx)
    if ctx.problems:
        raise RecipeError(ctx.problems, source)
    assert recipe is not None
    if recipe.name is None:
        recipe.name = default_name or "medsynth"
    recipe.source = source
    recipe.overrides = overrides
    return recipe


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def load_recipe(ref: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = find_recipe_file(str(ref))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}. Fix the syntax (indentation, quotes, ':').") from None
    return build_recipe(raw, str(path), overrides, default_name=path.stem)


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)


def iter_schema(cls=Recipe, prefix: str = ""):
    """Yield (dotted key, type name, default, help, choices/bounds) for every field; used by docs."""
    hints = _hints(cls)
    for f in schema_fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(inner) and inner is not ClassSpec:
            yield key, "mapping", None, f.metadata.get("help", ""), None
            yield from iter_schema(inner, key + ".")
            continue
        meta = f.metadata
        extra = []
        if meta.get("choices"):
            extra.append("one of " + ", ".join(meta["choices"]))
        for b, w in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")):
            if meta.get(b) is not None:
                extra.append(f"{w} {meta[b]}")
        yield key, _type_name(tp), to_dict(default), meta.get("help", ""), "; ".join(extra) or None
        if inner is ClassSpec or typing.get_origin(inner) is list and typing.get_args(inner)[0] is ClassSpec:
            yield from iter_schema(ClassSpec, key + "[].")


# ----------------------------------------------------------------------------- RECIPE resolution


def state_dir() -> Path:
    """Where medsynth remembers the last recipe per working directory."""
    env = os.environ.get("MEDSYNTH_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "medsynth"


def _last_file() -> Path:
    return state_dir() / "last-recipes.json"


def remember_recipe(recipe: Recipe) -> None:
    """Record the recipe (and its --set overrides) used from the current directory."""
    import json

    from .workspace import atomic_write_text

    path = _last_file()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    src = recipe.source
    if src and not src.startswith("<"):
        src = str(Path(src).resolve())
    data[str(Path.cwd().resolve())] = {"recipe": src, "overrides": list(recipe.overrides)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # remembering is a convenience; never fail a stage for it


def resolve_recipe(ref: str | None, overrides: list[str] | None = None,
                   say=lambda msg: None) -> Recipe:
    """RECIPE argument, else $MEDSYNTH_RECIPE, else ./medsynth.yaml, else the last recipe used here."""
    import json

    overrides = list(overrides or [])
    if ref:
        return load_recipe(ref, overrides)
    env = os.environ.get("MEDSYNTH_RECIPE")
    if env:
        say(f"recipe: {env} (from $MEDSYNTH_RECIPE)")
        return load_recipe(env, overrides)
    local = Path("medsynth.yaml")
    if local.is_file():
        say("recipe: ./medsynth.yaml")
        return load_recipe(local, overrides)
    path = _last_file()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    last = data.get(str(Path.cwd().resolve()))
    if last and last.get("recipe"):
        prev = list(last.get("overrides") or [])
        extra = f" with --set {' --set '.join(prev)}" if prev else ""
        say(f"recipe: {last['recipe']}{extra} (last used in this directory)")
        return load_recipe(last["recipe"], prev + overrides)
    raise UserError(
        "no recipe given: pass RECIPE (a path or a built-in name such as 'skin', 'kvasir', 'demo'), "
        "set $MEDSYNTH_RECIPE, or put a medsynth.yaml in this directory."
    )
