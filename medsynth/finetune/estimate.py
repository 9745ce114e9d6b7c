"""`medsynth finetune --dry-run`: parameter counts, estimated peak accelerator memory, steps and time.

Nothing here loads a weight or writes a file. The base's three configs (transformer/config.json,
text_encoder/config.json, vae/config.json) are read with ``load_config`` / ``T5Config.from_pretrained``
through the same offline-aware arguments as :mod:`medsynth.models.loading` (only the small JSON
files are needed: a user can plan before downloading 20 GB). The models are then built on the meta
device (``accelerate.init_empty_weights``) and given exactly the loop's LoRA injection
(:func:`medsynth.finetune.lora.add_lora` with the recipe's targets), so the trainable / frozen
counts are the loop's own, not a re-derivation.

Memory is a sum of named terms (bytes), each derived from the architecture; the formulas and why
are written next to each term below. What autograd keeps was read off the ops' saved tensors
(``torch.autograd.graph.saved_tensors_hooks`` on full-width blocks, torch 2.14 / diffusers 0.42):
an op saves an input only when a gradient needs it, so frozen Linear / Conv layers without LoRA keep
nothing, LoRA layers keep their input once. No constant is fitted to the bench; the one assumed
constant is the framework overhead (CUDA context, cuBLAS/cuDNN workspaces), which the CPU bench
cannot see. bench/bench_memory_estimate.py checks the whole peak less that overhead, and the
training-time terms alone, against the peak RSS of real training runs on the CPU (docs/gpu.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

GIB = 1024 ** 3
GPU_SIZES_GB = (24, 40, 80)
# CUDA context + cuBLAS/cuDNN workspaces + caching-allocator slack: an assumed figure (typical for
# a PyTorch process on an A100/H100), not measured here (no GPU on the machines this was built on).
FRAMEWORK_OVERHEAD = int(1.5 * GIB)


# ----------------------------------------------------------------------------- configs and meta models


@dataclass
class Configs:
    transformer: dict
    text_encoder: object  # transformers.T5Config
    vae: dict
    base: str             # what was read: resolved id or directory, or "tiny (not built yet)"


def _tiny_configs(recipe) -> Configs:
    """The tiny base's configs: from its built directory when there is one, else computed in memory
    (building it would fit a VAE and write into the workspace, which a dry run must not do)."""
    from transformers import T5Config

    from ..models import tiny

    try:
        root = tiny.base_dir(recipe)
    except UserError:
        root = None  # no manifest yet: the cache key needs the train images
    if root is not None and (root / tiny.INFO_FILE).is_file():
        return _dir_configs(recipe, str(root))
    vocab = len(tiny.build_tokenizer(recipe))  # trained in memory on the class texts (a second, no files)
    return Configs(tiny.transformer_config(recipe), T5Config(**tiny.text_config(recipe, vocab)),
                   tiny.vae_config(recipe), "tiny (not built yet: configs computed from model.tiny)")


def _backbone(recipe):
    """The recipe's backbone; the default family when model_index.json cannot be read (the config
    reads below then say what is missing)."""
    from ..models.backbone import DEFAULT_FAMILY, family_of, get

    return get(family_of(recipe, strict=False) or DEFAULT_FAMILY)


def _dir_configs(recipe, base: str) -> Configs:
    from diffusers import AutoencoderKL
    from transformers import T5Config

    from ..models import loading

    bb = _backbone(recipe)
    out = {}
    for part in ("transformer", "text_encoder", "vae"):
        kw = loading._load_kwargs(recipe, base, part)
        try:
            if part == "text_encoder":
                out[part] = T5Config.from_pretrained(base, **kw)
            else:
                cls = bb.denoiser_class() if part == "transformer" else AutoencoderKL
                out[part] = dict(cls.load_config(base, **kw))
        except (OSError, ValueError) as e:
            raise UserError(f"model.base: cannot read {part}/config.json of {base} ({e.__class__.__name__}: "
                            f"{str(e)[:300]}). The dry run needs only the three config.json files of a {bb.label} "
                            f"base in diffusers layout ({bb.layout}). " + loading._how_to_get(base)) from None
    return Configs(out["transformer"], out["text_encoder"], out["vae"], base)


def read_configs(recipe) -> Configs:
    from ..models import loading

    if recipe.model.base.strip() == "tiny":
        return _tiny_configs(recipe)
    base = loading.resolve_base(recipe)
    if loading._is_local(base) and not Path(base).is_dir():
        raise UserError(f"model.base: {base} is not a directory. Give a local diffusers directory ({loading.LAYOUT}), "
                        "a Hugging Face id, or 'tiny'. " + loading._how_to_get(recipe.model.base))
    return _dir_configs(recipe, base)


def meta_models(recipe, cfgs: Configs):
    """(transformer, text_encoder, vae) on the meta device, with the loop's adapters applied."""
    import warnings

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    from . import lora

    ft = recipe.finetune
    bb = _backbone(recipe)
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_config's "unused keys" note for the hub's legacy config keys
        tr = bb.denoiser_class().from_config(cfgs.transformer)
        te = T5EncoderModel(cfgs.text_encoder)
        vae = AutoencoderKL.from_config(cfgs.vae)
    # init_empty_weights re-registers each parameter (also on assignment inside it), which unties T5's
    # shared input embedding from encoder.embed_tokens (one tensor in the loaded model): tie it here.
    te.encoder.embed_tokens.weight = te.shared.weight
    with init_empty_weights():
        vae.requires_grad_(False)
        te.requires_grad_(False)
        if ft.adapter == "full":
            tr.requires_grad_(True)
        else:
            lora.add_lora(tr, ft.lora, bb.lora_targets("denoiser", ft.lora.transformer_targets),
                          f"{bb.label} {bb.denoiser_part}")
        if ft.lora.text_encoder:
            name = bb.text_encoder_parts[0]  # the dry run counts one text encoder (T5) for now
            lora.add_lora(te, ft.lora, bb.lora_targets(name, ft.lora.text_encoder_targets), f"{bb.label} {name}")
    return tr, te, vae


def _counts(m) -> dict:
    tr = sum(p.numel() for p in m.parameters() if p.requires_grad)
    tot = sum(p.numel() for p in m.parameters())
    return {"trainable": tr, "frozen": tot - tr, "total": tot}


# ----------------------------------------------------------------------------- activation terms (elements)
#
# Symbols: B batch, N image tokens = (latent side / patch)^2, D DiT width = heads * head_dim,
# F = 4 D (PixArt's gelu-approximate FeedForward), H heads, L text tokens (model.max_text_tokens),
# Ct caption channels (T5 width). Counts are ELEMENTS; bytes follow from the activation dtype.


def dit_block_elems(B: int, N: int, D: int, F: int, H: int, L: int, adaln_lora: bool) -> int:
    """What autograd keeps for one PixArt block (BasicTransformerBlock, ada_norm_single) with LoRA on
    its attention and feed-forward projections.

    - 2 B*N*F: GELU keeps its input, ff.net.2's LoRA keeps the GELU output.
    - 12 B*N*D always: the input kept once by the q/k/v LoRA layers of each attention (self: the
      modulated tokens; cross: the residual stream), q, k, v and the output kept by self-attention's
      scaled_dot_product_attention, q and the output kept by cross-attention's, the head-merged
      copies kept by the two to_out LoRAs, the modulated input of ff.net.0's LoRA.
    - 4 B*N*D more with LoRA on adaLN (preset 'paper'): the shift/scale/gate vectors then carry a
      gradient, so the three modulation products keep their token inputs, and LayerNorm its input.
    - 2 B*H*N logsumexps of the two SDPA calls and 6 B*N LayerNorm statistics (small);
      2 B*L*D + B*H*L: cross-attention keys and values from the caption tokens.
    Checked against torch.autograd.graph.saved_tensors_hooks (tests/test_finetune_dryrun.py).
    """
    per_tok = (16 if adaln_lora else 12) * D + 2 * F + 2 * H + 6
    return B * N * per_tok + B * L * (2 * D + H)


def dit_outer_elems(B: int, N: int, D: int, L: int, Ct: int, C: int, latent_hw: int, adaln_lora: bool = True) -> int:
    """Outside the blocks: the latent input (B*C*h*w). With LoRA on the embedders and output layer
    (preset 'paper') also the tokens after the patch embedding (B*N*D), the final layer's norm input,
    modulated output and proj_out's input (3 B*N*D), and the caption projection's T5 input, GELU
    input and output and projected captions (B*L*(Ct + 3 D)); with 'attn_ff' those layers are frozen
    and keep nothing."""
    if not adaln_lora:
        return B * C * latent_hw * latent_hw
    return B * C * latent_hw * latent_hw + 4 * B * N * D + B * L * (Ct + 3 * D)


def dit_backward_elems(B: int, N: int, D: int, F: int) -> int:
    """Working set of the first backward ops of a block: the GELU backward holds the gradient of its
    output and of its input (2 B*N*F) while the residual stream's gradient and the gradient being
    produced for it live (2 B*N*D)."""
    return 2 * B * N * F + 2 * B * N * D


def dit_step_elems(B, N, D, F, H, L, Ct, C, latent_hw, layers, checkpointing, adaln_lora) -> int:
    """One DiT forward + backward with grad. Without checkpointing every block's activations live
    until backward; with the DiT's block checkpointing only each block's input (B*N*D) is kept, and
    one block is recomputed at a time in backward."""
    block = dit_block_elems(B, N, D, F, H, L, adaln_lora)
    kept = layers * B * N * D + block if checkpointing else layers * block
    return kept + dit_outer_elems(B, N, D, L, Ct, C, latent_hw, adaln_lora)


def hldf_dit_elems(k: int, B: int, N: int, D: int, F: int, H: int, L: int, Ct: int, C: int, latent_hw: int,
                   layers: int, checkpointing: bool, adaln_lora: bool) -> tuple[int, int]:
    """(kept, backward working set) of k DPM-Solver++ steps with grad at batch B (2x the prompts with CFG).

    Every solver step keeps what one DiT forward keeps - with the DiT's block checkpointing only its
    block inputs and the layers outside the blocks - but the caption projection's LoRA input, the
    CFG batch of T5 embeddings, is one tensor for all steps (sampling.denoise concatenates it once).
    The solver keeps a few latent-sized tensors per step (model output, sample, CFG halves). The
    backward working set is the first backward's, plus one recomputed block when checkpointing.
    """
    ctx_once = B * L * Ct if adaln_lora else 0
    if checkpointing:
        kept = k * (layers * B * N * D + dit_outer_elems(B, N, D, L, Ct, C, latent_hw, adaln_lora) - ctx_once)
        work = dit_block_elems(B, N, D, F, H, L, adaln_lora) + dit_backward_elems(B, N, D, F)
    else:
        kept = k * (dit_step_elems(B, N, D, F, H, L, Ct, C, latent_hw, layers, False, adaln_lora) - ctx_once)
        work = dit_backward_elems(B, N, D, F)
    return kept + ctx_once + k * 8 * B * C * latent_hw * latent_hw, work


def t5_elems(B: int, L: int, Dt: int, Ft: int, Ht: int, layers: int, checkpointing: bool) -> int:
    """T5 v1.1 encoder forward with LoRA on q,k,v,o,wi_0,wi_1,wo, per layer:
    8 B*L*Dt (two RMSNorm inputs and their float32 products, the q/k/v LoRA input, the attention
    output kept by o's LoRA, q and k, v as kept by the matmuls), 7 B*L*Ft (wi_0 output kept by GELU,
    GELU output and wi_1 output kept by their product, the product kept by wo's LoRA, peft's 2-D
    views), B*Ht*L^2 (the softmax output kept by the value matmul), plus 2 B*L*Dt for the embeddings
    and the final norm. Checkpointing keeps one B*L*Dt per layer and recomputes one layer."""
    layer = B * L * (8 * Dt + 7 * Ft) + B * Ht * L * L
    kept = layers * B * L * Dt + layer if checkpointing else layers * layer
    return kept + 2 * B * L * Dt


def t5_dropout_bytes(B: int, L: int, Dt: int, Ft: int, Ht: int, layers: int, act: int) -> int:
    """With the base's dropout active (finetune.base_dropout) every dropout site keeps a bool mask
    (1 byte) and its output is a new tensor kept by the next op (act bytes): three Dt-wide sites
    (attention output, FFN output, embeddings / final), the Ft-wide FFN hidden and the attention
    probabilities."""
    return layers * (B * L * (3 * Dt + Ft) + B * Ht * L * L) * (act + 1)


def vae_decode_elems(B: int, res: int, cfg: dict, checkpointing: bool = False) -> tuple[int, int, int]:
    """VAE decoder (AutoencoderKL, UpDecoderBlock2D) forward and backward with grad to the latents,
    weights frozen.

    Returns (norm/activation elements, conv-input elements, backward working elements). Every
    GroupNorm and SiLU keeps its input; every convolution keeps its input too (the conv backward
    saves it even when the weight is frozen). A ResNet block (Cin -> Cout, S pixels) keeps x, GN1 out
    and SiLU1 out (3 Cin S) and conv1 out, GN2 out, SiLU2 out (3 Cout S) - of which 2 are conv
    inputs; an upsampler keeps its nearest-upsampled output (conv input, C * 4S); the mid block's
    attention (one head, width C at latent size) keeps its GroupNorm input and q, k, v, out (5 C S);
    the output head keeps GN input, SiLU input and conv_out input (3 C S at full resolution).

    Without checkpointing everything above lives when backward starts; the working set is a
    gradient of the largest map and the one being produced (2 x largest map).

    With gradient checkpointing (the loop enables it on the VAE too) the decoder checkpoints its
    mid block and each up block, so forward keeps only their inputs (and the head). Backward runs the
    head first (its saved tensors are freed before any block is recomputed), then recomputes one
    block at a time: the peak is the kept block inputs plus the largest recomputed block - whose
    first saved tensor is its own checkpoint input, already counted - plus the gradient of that
    block's output and the one being produced from it (2 x Cout S_out). All of it is returned in
    the first (fp32) slot, conv none: the checkpoint inputs are block outputs, which run in fp32.
    """
    ch = list(reversed(cfg["block_out_channels"]))
    lpb = int(cfg.get("layers_per_block", 2)) + 1
    n = len(ch)
    side = res // (2 ** (n - 1))
    S = side * side
    norm = conv = 0
    lat_c = int(cfg.get("latent_channels", 4))
    lat_in = B * lat_c * S
    conv += lat_in                               # conv_in input
    mid_attn = cfg.get("mid_block_add_attention", True)
    # mid block: two ResNets at ch[0] and (optionally) attention
    norm += 2 * 4 * B * ch[0] * S
    conv += 2 * 2 * B * ch[0] * S
    if mid_attn:
        norm += 5 * B * ch[0] * S
    biggest = 0
    kept_inputs = B * ch[0] * S                  # checkpointing: the mid block's input
    # a recomputed block: its saved elements less its own input, plus two output-sized gradients
    block_peak = norm + conv - lat_in - B * ch[0] * S + 2 * B * ch[0] * S
    cin = ch[0]
    for i, c in enumerate(ch):
        kept_inputs += B * cin * S               # checkpointing: this up block's input
        s_in = S
        bn = bc = 0
        for j in range(lpb):
            a = cin if j == 0 else c
            bn += B * S * (2 * a + 2 * c)
            bc += B * S * (a + c)
            biggest = max(biggest, B * S * max(a, c))
        block_in = B * cin * s_in
        cin = c
        if i < n - 1:
            S *= 4
            bc += B * c * S                      # the upsampled map kept by the upsampler's conv
            biggest = max(biggest, B * c * S)
        norm += bn
        conv += bc
        block_peak = max(block_peak, bn + bc - block_in + 2 * B * c * S)
    head = 3 * B * ch[-1] * S
    norm += 2 * B * ch[-1] * S
    conv += B * ch[-1] * S
    if checkpointing:
        # the head's backward (its 3 C S plus two C S gradients) ends before the first recompute
        return lat_in + kept_inputs + max(block_peak, head + 2 * B * ch[-1] * S), 0, 0
    return norm, conv, 2 * biggest


def vae_encode_elems(B: int, res: int, cfg: dict) -> int:
    """Peak live elements of a no-grad VAE encode (AutoencoderKL, DownEncoderBlock2D) of B images.

    Nothing is kept for backward, so the peak is the largest set of maps alive at once inside one
    ResNet block: the encoder's own reference to the input of the current down block, the block's
    input to this ResNet (a separate map from the second ResNet of a level on), and at the residual
    add the last conv's output, the sum and the sum divided by ``output_scale_factor`` (3 maps of the
    block's width); a first ResNet that widens the channels also holds its shortcut conv's output.
    The full-resolution level is the largest for every real VAE (5 maps of 128 channels for the SD
    VAE). Plus the images themselves (in_channels at full size), which sit on the device. Checked
    against the live tensor storages of ``vae.encode`` under no_grad (1, 2 and 3 ResNets per level,
    mid-block attention on and off), which it matches exactly (the images aside).
    """
    chs = cfg.get("block_out_channels")
    if not chs:
        return 0  # not a KL VAE with down blocks (e.g. TAEF2): not modelled
    lpb = int(cfg.get("layers_per_block", 2))
    S = res * res
    peak = 0
    cin = chs[0]  # conv_in's output feeds the first level
    for i, c in enumerate(chs):
        first = cin + 3 * c + (c if cin != c else 0)
        later = cin + c + 3 * c if lpb >= 2 else 0
        peak = max(peak, B * S * max(first, later))
        cin = c
        if i < len(chs) - 1:
            S //= 4
    # The mid block at the last level: its second ResNet holds 5 maps as above; its attention (one
    # head) holds the input, the GroupNorm output (the keys' and values' source), q, k, v, the
    # attention output, its head-merged copy and to_out's output: 8 maps of the last width.
    peak = max(peak, B * S * chs[-1] * (8 if cfg.get("mid_block_add_attention", True) else 5))
    return peak + B * int(cfg.get("in_channels", 3)) * res * res


# ----------------------------------------------------------------------------- the plan


@dataclass
class Term:
    name: str
    bytes: int
    note: str
    training: bool = True  # part of what the CPU bench measures (vs. weights / fixed overhead)


@dataclass
class Plan:
    counts: dict
    terms: list[Term] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def training_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.training)


def _act_bytes(mp: str) -> int:
    return 2 if mp in ("bf16", "fp16") else 4


def estimate(recipe, step_seconds: float | None = None, processes: int = 1) -> Plan:
    """Resolve the recipe and base (configs only), count parameters, estimate memory and steps."""
    import torch

    ft, hc, lc = recipe.finetune, recipe.finetune.hldf, recipe.finetune.lora
    bb = _backbone(recipe)
    # The formulas below model one layout: a DiT conditioned by one trainable T5 text encoder. Other
    # layouts (a UNet, two CLIPs, frozen BERT + mT5, class labels) would get confidently wrong numbers.
    if bb.denoiser_part != "transformer" or tuple(bb.text_encoder_parts) != ("text_encoder",):
        raise UserError(f"finetune --dry-run estimates only a DiT conditioned by one T5 text encoder in this version, "
                        f"not model.family '{bb.name}'; run `medsynth finetune` with a small finetune.max_steps "
                        f"to measure it instead")
    cfgs = read_configs(recipe)
    tr, te, vae = meta_models(recipe, cfgs)
    counts = {"transformer": _counts(tr), "text_encoder": _counts(te), "vae": _counts(vae)}
    n_train = counts["transformer"]["trainable"] + counts["text_encoder"]["trainable"]
    counts["all"] = {"trainable": n_train,
                     "total": sum(counts[k]["total"] for k in ("transformer", "text_encoder", "vae"))}
    # What the loop logs as "trainable N of M parameters" (the VAE is not in its M).
    counts["loop_total"] = counts["transformer"]["total"] + counts["text_encoder"]["total"]

    mp = ft.mixed_precision
    w = 2 if mp in ("bf16", "fp16") else 4  # the loop loads transformer and T5 in the autocast dtype
    a = _act_bytes(mp)
    tcfg = tr.config
    D = int(tcfg.num_attention_heads) * int(tcfg.attention_head_dim)
    H = int(tcfg.num_attention_heads)
    F = 4 * D
    layers = int(tcfg.num_layers)
    C = int(tcfg.in_channels)
    Ct = int(tcfg.caption_channels)
    p = int(tcfg.patch_size)
    res = recipe.model.resolution
    vscale = 2 ** (len(cfgs.vae["block_out_channels"]) - 1)
    hw = res // vscale
    N = (hw // p) ** 2
    L = recipe.model.max_text_tokens
    tc = cfgs.text_encoder
    Dt, Ft, Ht, Lt = int(tc.d_model), int(tc.d_ff), int(tc.num_heads), int(tc.num_layers)
    B = ft.batch_size
    ckpt = ft.gradient_checkpointing
    train_te = bool(lc.text_encoder)
    adaln_lora = ft.adapter == "full" or lc.transformer_targets == "paper"

    terms: list[Term] = []
    # -- weights: frozen base parts in the autocast dtype (the loop loads them so), VAE always fp32
    #    (the loop keeps it fp32 for the decode), adapters as fp32 masters.
    if ft.adapter == "full":
        tr_w = counts["transformer"]["total"] * 4
    else:
        tr_w = counts["transformer"]["frozen"] * w + counts["transformer"]["trainable"] * 4
    terms.append(Term("weights: transformer", tr_w, f"{counts['transformer']['frozen']:,} frozen x {w} B + "
                      f"trainable fp32 masters", training=False))
    terms.append(Term("weights: text_encoder", counts["text_encoder"]["frozen"] * w + counts["text_encoder"]["trainable"] * 4,
                      f"{counts['text_encoder']['frozen']:,} frozen x {w} B + trainable fp32 masters", training=False))
    terms.append(Term("weights: vae", counts["vae"]["total"] * 4, "fp32 (decoded with grad in fp32)", training=False))
    # -- gradients (fp32, live from the first backward to the optimizer step) and AdamW's two moments
    terms.append(Term("gradients", n_train * 4, f"{n_train:,} trainable x 4 B"))
    opt = ft.optimizer
    if opt == "adamw8bit":
        terms.append(Term("optimizer states", n_train * 2, "AdamW 8-bit: 2 moments x 1 B (bitsandbytes)"))
    else:
        terms.append(Term("optimizer states", n_train * 8, "AdamW: 2 fp32 moments x 4 B"
                          + (" (optimizer auto: 8-bit on CUDA when bitsandbytes is installed, 4x less)" if opt == "auto" else "")))

    # -- one diffusion step: DiT forward/backward, T5 with grad when it has LoRA (no text cache then).
    # Backward runs the DiT's graph (freed as it goes) before T5's, so the step's peak is the larger
    # of T5 kept + DiT (kept and backward working set) and T5 kept + T5's backward (with
    # checkpointing: its one recomputed layer).
    dit = dit_step_elems(B, N, D, F, H, L, Ct, C, hw, layers, ckpt, adaln_lora) + dit_backward_elems(B, N, D, F)
    # noise, noisy latents, prediction, target and the MSE's difference
    dit += 6 * B * 2 * C * hw * hw
    t5_drop = bool(getattr(ft, "base_dropout", False)) and float(getattr(tc, "dropout_rate", 0.0)) > 0
    t5_one = t5_elems(B, L, Dt, Ft, Ht, Lt, ckpt) if train_te else 0
    t5_one_bytes = t5_one * a + (t5_dropout_bytes(B, L, Dt, Ft, Ht, Lt, a) if (train_te and t5_drop) else 0)
    t5_layer = (B * L * (8 * Dt + 7 * Ft) + B * Ht * L * L) * a if (train_te and ckpt) else 0
    diff_bytes = t5_one_bytes - t5_layer + max(dit * a, t5_layer)
    diff_note = (f"B={B}, N={N} tokens, D={D}, {layers} blocks, checkpointing {'on' if ckpt else 'off'}"
                 + (f"; T5 with grad ({Lt} layers, {L} tokens)" if train_te else "; T5 frozen (text cached)"))

    # -- the HLDF step: M solver steps with grad (CFG: batch 2B), then the VAE decode with grad
    hldf_bytes = 0
    hldf_parts: dict = {}
    if hc.enabled:
        steps = hc.steps
        if hc.start == "noised_real":
            steps = hc.steps - min(hc.steps - 1, int(round(hc.steps * (1.0 - hc.start_strength))))
        k = min(steps, hc.grad_last_k) if hc.grad_last_k else steps
        cfg_b = 2 * B if hc.guidance > 1.0 else B
        # The step's peak is not the sum of every part's own peak: forward builds T5's graphs, then
        # the DiT's over the solver steps, then the VAE's; backward runs the VAE's first (freed
        # before the DiT's starts), then the DiT's (freed before T5's), then T5's. So the peak is
        # what T5 keeps plus the larger of (what the DiT keeps + the larger of the VAE's whole
        # decode and the DiT's first backward) and T5's backward (its recomputed layer).
        kept, work = hldf_dit_elems(k, cfg_b, N, D, F, H, L, Ct, C, hw, layers, ckpt, adaln_lora)
        dit_kept, dit_work = kept * a, work * a
        norm, conv, vwork = vae_decode_elems(B, res, cfgs.vae, ckpt)
        # Under bf16 autocast the convolutions run (and keep their inputs) in bf16, GroupNorm / SiLU in fp32.
        vae_b = norm * 4 + conv * (2 if mp in ("bf16", "fp16") else 4) + vwork * 4
        t5_kept = t5_work = 0
        if train_te:
            # captions and the negative prompt are encoded with grad; both graphs live through backward.
            # Checkpointed, each keeps its layer inputs, and backward recomputes one layer at a time.
            t5_kept, t5_work = 2 * (t5_one_bytes - t5_layer), t5_layer
        hldf_parts = {"t5_kept": t5_kept, "dit_kept": dit_kept, "vae_decode_peak": vae_b,
                      "dit_backward_work": dit_work, "t5_backward_work": t5_work}
        hldf_bytes = t5_kept + max(dit_kept + max(vae_b, dit_work), t5_work)
        hldf_note = (f"{k} of M={hc.steps} solver steps with grad, batch {cfg_b}{' (CFG)' if cfg_b > B else ''}; "
                     f"VAE decode with grad at {res} px: {vae_b / GIB:.2f} GiB")

    # -- the VAE encode of training images (no grad, fp32 VAE, on the device). With the latent cache
    #    the loop encodes the train split CACHE_CHUNK images at a time before training, when neither
    #    gradients nor optimizer states exist; without it, each step encodes its batch before the
    #    forward, after zero_grad(set_to_none=True) freed the gradients (AdamW's states exist). So
    #    the peak it sets is weights + the encode (+ optimizer states): as a term here, the encode
    #    less what does not exist then. At 512 px it is 5 GiB for 8 images, more than a plain
    #    diffusion step's activations, so it can be the run's peak.
    n_images = None
    try:
        from ..data import read_manifest

        n_images = len(read_manifest(recipe.workdir_path, "train"))
    except UserError:
        pass
    from .loop import CACHE_CHUNK  # here: importing the loop loads torch, which the rest of this module avoids

    cached = ft.cache_latents and ft.augment == "none"
    enc_images = min(CACHE_CHUNK, n_images or CACHE_CHUNK) if cached else B
    enc_bytes = vae_encode_elems(enc_images, res, cfgs.vae) * 4
    opt_bytes = next(t.bytes for t in terms if t.name == "optimizer states")
    absent = n_train * 4 + (opt_bytes if cached else 0)  # gradients (+ optimizer states)
    enc_term = enc_bytes - absent
    step_bytes = max(diff_bytes, hldf_bytes)
    if enc_term > step_bytes:
        terms.append(Term("activations: VAE encode", enc_term,
                          f"{enc_images} images at {res} px, no grad, fp32: {enc_bytes / GIB:.2f} GiB, "
                          + ("for the latent cache before training, less gradients and optimizer states (not yet "
                             "allocated)" if cached else "each step before the forward, less the (freed) gradients")))
        peak_step = "vae_encode"
    elif hldf_bytes > diff_bytes:
        terms.append(Term("activations: HLDF step", hldf_bytes, hldf_note))
        peak_step = "hldf"
    else:
        terms.append(Term("activations: diffusion step", diff_bytes, diff_note))
        peak_step = "diffusion"
    terms.append(Term("framework overhead", FRAMEWORK_OVERHEAD, "CUDA context, cuBLAS/cuDNN workspaces, allocator "
                      "slack (assumed, not measured)", training=False))

    # -- steps and time
    steps_note = None if n_images is not None else (
        f"{recipe.workdir_path / 'manifest.csv'} not found: run `medsynth prepare` for steps per epoch")
    accum = ft.gradient_accumulation_steps
    spe = math.ceil(n_images / (B * processes) / accum) if n_images else None
    total = ft.max_steps or (math.ceil(ft.epochs * math.ceil(n_images / (B * processes)) / accum) if n_images else None)
    plan = Plan(counts=counts, terms=terms)
    gib = plan.peak / GIB
    plan.info = {
        "base": cfgs.base,
        "mixed_precision": mp,
        "activation_bytes": a,
        "batch_size": B,
        "resolution": res,
        "tokens": N,
        "gradient_checkpointing": ckpt,
        "text_encoder_lora": train_te,
        "hldf": {"enabled": hc.enabled, "steps": hc.steps, "every_n_steps": hc.every_n_steps,
                 "grad_last_k": hc.grad_last_k, "guidance": hc.guidance},
        "peak_step": peak_step,
        "diffusion_step_bytes": diff_bytes,
        "hldf_step_bytes": hldf_bytes,
        "vae_encode_bytes": enc_bytes,
        "vae_encode_images": enc_images,
        "hldf_parts": hldf_parts,
        "train_images": n_images,
        "processes": processes,
        "optimizer_steps_per_epoch": spe,
        "total_steps": total,
        "steps_note": steps_note,
        "step_seconds": step_seconds,
        "epoch_seconds": (spe * step_seconds) if (spe and step_seconds) else None,
        "time_note": None if step_seconds else "unknown: no throughput figure (give --step-seconds S, e.g. from "
                                               "the 'time' column of a short run's finetune/log.jsonl)",
        # GPU "24 / 40 / 80 GB" cards hold that many GiB; the overhead term already covers allocator slack.
        "verdict": {f"{g}GB": ("fits" if plan.peak <= g * GIB else "does not fit") for g in GPU_SIZES_GB},
        "peak_gib": round(gib, 2),
    }
    del tr, te, vae
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return plan


def to_json(plan: Plan) -> dict:
    return {
        "stage": "finetune", "dry_run": True,
        "parameters": plan.counts,
        "memory": {"peak_bytes": plan.peak, "peak_gib": round(plan.peak / GIB, 3),
                   "training_bytes": plan.training_bytes,
                   "terms": [{"name": t.name, "bytes": t.bytes, "gib": round(t.bytes / GIB, 3), "note": t.note,
                              "training": t.training} for t in plan.terms]},
        **{k: v for k, v in plan.info.items()},
    }


def _size(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB // 4 else f"{n / 2**20:8.1f} MiB"


def table(plan: Plan) -> str:
    c = plan.counts
    i = plan.info
    lines = [f"medsynth finetune --dry-run   base: {i['base']}", "",
             f"{'module':14s} {'trainable':>14s} {'frozen':>16s} {'total':>16s}"]
    for k in ("transformer", "text_encoder", "vae"):
        lines.append(f"{k:14s} {c[k]['trainable']:>14,} {c[k]['frozen']:>16,} {c[k]['total']:>16,}")
    lines += ["", f"estimated peak accelerator memory ({i['mixed_precision']}, batch {i['batch_size']}, "
                  f"{i['resolution']} px, checkpointing {'on' if i['gradient_checkpointing'] else 'off'}, "
                  f"HLDF {'M=%d' % i['hldf']['steps'] if i['hldf']['enabled'] else 'off'}):"]
    for t in plan.terms:
        lines.append(f"  {t.name:30s} {_size(t.bytes)}   {t.note}")
    lines.append(f"  {'total':30s} {_size(plan.peak)}")
    lines.append("  " + ", ".join(f"{k}: {v}" for k, v in i["verdict"].items()))
    lines.append("")
    if i["train_images"] is None:
        lines.append(f"steps: {i['steps_note']}")
    else:
        lines.append(f"steps: {i['train_images']} train images, {i['optimizer_steps_per_epoch']} optimizer steps per "
                     f"epoch, {i['total_steps']} in total")
    lines.append("time per epoch: " + (f"{i['epoch_seconds'] / 60:.1f} min at {i['step_seconds']} s/step"
                                       if i["epoch_seconds"] else i["time_note"]))
    return "\n".join(lines)


__all__ = ["estimate", "to_json", "table", "Plan", "Term", "read_configs", "meta_models"]
