"""The tiny offline base (``model.base: tiny``): a small PixArt-alpha pipeline built in code.

What it is (see docs/models.md for the numbers):

- ``transformer/``: a real ``PixArtTransformer2DModel`` shaped like PixArt-XL-2-512x512 (adaLN-single,
  patch 2, learned sigma so ``out_channels = 2 * latent channels``, no resolution micro-conditions),
  only narrower and shallower; randomly initialised from the recipe seed.
- ``text_encoder/``: a real ``T5EncoderModel`` configured like T5 v1.1 (gated-GELU feed-forward, so
  the ``wi_0``/``wi_1`` LoRA targets exist), randomly initialised.
- ``tokenizer/``: a real ``T5Tokenizer`` (Unigram, pad 0 / eos 1 / unk 2 like T5) trained with the
  ``tokenizers`` library on an embedded English caption corpus plus the recipe's own texts.
- ``vae/``: with ``model.tiny.autoencoder: fitted`` (default) a real ``AutoencoderKL`` *fitted* to the
  prepared train images, because a random autoencoder cannot give recognisable images; its latents
  are centred (folded into the 1x1 quant convolutions) and ``scaling_factor`` is measured so scaled
  latents have unit standard deviation. With ``taef2``: the pretrained TAEF2 tiny autoencoder
  shipped with medsynth (``taef2.AutoencoderTAEF2``, 32 latent channels at 1/8 size, no fitting),
  its latents centred per channel and scaled the same way, measured on the train images; the DiT
  then uses patch size 1 (see ``dit_patch_size``).
- ``scheduler/``: ``DPMSolverMultistepScheduler`` with the configuration of PixArt-XL-2-512x512, except
  ``prediction_type`` (``model.tiny.prediction_type``, v-prediction by default): see ``scheduler_config``.

It is saved with ``save_pretrained`` in the diffusers layout into
``<workdir>/tiny-base/<key>/`` and then loaded back through the same ``from_pretrained`` path as a
downloaded model. The key hashes everything the build depends on, so a second resolve reuses it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from pathlib import Path

from .. import console
from ..errors import UserError
from ..recipe import CAPTION_PROMPT, to_dict
from ..workspace import _os_error, atomic_write_json, ensure_dir, sha256_json

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# Bump when the build changes in a way that makes old cached bases wrong.
TINY_FORMAT = 3  # 2: prediction_type from model.tiny (v-prediction by default); 3: model.tiny.autoencoder
INFO_FILE = "medsynth_tiny.json"

# TAEF2's fixed geometry (medsynth/models/taef2.py), here so resolving the cache key imports no torch.
TAEF2_LATENT_CHANNELS = 32
TAEF2_FACTOR = 8

# scheduler/scheduler_config.json of PixArt-alpha/PixArt-XL-2-512x512 (the 1024-MS model uses the same).
PIXART_SCHEDULER = {
    "algorithm_type": "dpmsolver++",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

# English the tiny tokenizer learns its pieces from: the words captions of medical images use
# (colours, shapes, borders, textures, anatomy, findings) and the prompt templates. Written for
# this project; the recipe's modality, visual features and class texts are added at build time.
CORPUS = """
A dermoscopic image of a skin lesion. An endoscopic image of the colon. A medical image of tissue.
The image shows a lesion with a specific color, symmetry, border, shape and texture.
The lesion is round, oval, irregular, asymmetric, symmetric, elongated, flat, raised or nodular.
Colours: red, dark red, pink, light pink, purple, violet, blue, blue-gray, grey, gray, white, black,
brown, light brown, dark brown, tan, beige, yellow, orange, green, reddish, brownish, bluish,
pinkish, yellowish, whitish, blackish, pale, bright, dark, light, uniform, variegated, mottled.
Borders are well-defined, ill-defined, sharp, blurred, smooth, jagged, notched, scalloped, regular,
irregular, fuzzy, clear, diffuse, with a halo, with a rim, with a margin.
Textures are smooth, rough, scaly, crusted, glossy, shiny, dull, granular, grainy, velvety, waxy,
ulcerated, bumpy, lumpy, wrinkled, fibrous, mucosal, vascular, hairy, speckled, dotted, streaked.
Structures: dots, globules, streaks, lines, network, pigment network, reticular pattern, blotches,
vessels, blood vessels, arborizing vessels, dotted vessels, lacunae, clods, cysts, milia, scars,
regression structures, veil, pseudopods, radial streaming, white areas, shiny white lines.
The centre is darker than the periphery. The edge is lighter. There is a central patch and a
peripheral ring. Areas of pigmentation are distributed evenly or unevenly across the lesion.
Findings: nevus, naevus, mole, melanoma, carcinoma, basal cell carcinoma, keratosis, actinic
keratosis, seborrheic keratosis, benign keratosis, dermatofibroma, vascular lesion, angioma,
haemangioma, hemangioma, pyogenic granuloma, lentigo, polyp, polyps, adenoma, ulcer, erosion,
inflammation, colitis, bleeding, stool, impacted stool, residue, feces, faeces, mucosa, fold,
folds, lumen, cecum, caecum, normal cecum, appendix, ileocecal valve, rectum, sigmoid, esophagus,
stomach, pylorus, duodenum, z-line, oesophagitis, esophagitis, barrett, dyed, lifted, resection
margins, tumour, tumor, cyst, nodule, mass, plaque, papule, macule, patch, scale, crust, lesion.
Bowel preparation quality on the Boston scale: bbps 0, bbps 1, bbps 2, bbps 3, poor, adequate,
good, excellent, clean, partially clean, covered, visible, obscured, liquid, solid, semi-solid.
The background is skin, normal skin, surrounding skin, the mucosal wall, the bowel wall, tissue.
Image quality: sharp, blurry, in focus, out of focus, bright, dim, glare, reflection, specular
highlight, shadow, vignette, dark corners, ruler, hair, bubbles, air bubbles, instrument, text.
Sizes: small, tiny, medium, large, big, wide, narrow, thick, thin, few, many, several, multiple,
single, one, two, three, four, five, central, peripheral, left, right, upper, lower, top, bottom.
Positions: in the centre, at the edge, near the border, along the margin, on the surface, inside,
outside, around, across, within, throughout, scattered, clustered, grouped, isolated.
Please describe the image using the following visual features. Start with the class template and
ensure the description does not exceed 100 words. The image has a mean intensity, a contrast, a
hue, a saturation, a brightness, a colour distribution and a spatial structure.
Numbers 0 1 2 3 4 5 6 7 8 9 10 20 50 100 percent % mm cm px and, or, with, without, of, in, on,
at, to, from, by, is, are, has, have, shows, appears, seems, contains, features, displays, a, an,
the, this, that, these, there, it, its, which, where, while, also, some, most, more, less, very.
"""

# Characters the tokenizer always has a piece for, so no printable ASCII text becomes <unk>.
_ALPHABET = [chr(c) for c in range(33, 127)] + list("°µ×–—’“”é")


# ----------------------------------------------------------------------------- inputs of a build


def class_texts(recipe) -> list[str]:
    """Class category texts: from the prepared workspace when there is one, else from the recipe."""
    from ..data import read_classes

    path = recipe.workdir_path / "classes.json"
    if path.is_file():
        return [str(c.get("category") or c["name"]) for c in read_classes(recipe.workdir_path)]
    return [c.resolved_category() for c in (recipe.classes or [])]


def tokenizer_corpus(recipe) -> list[str]:
    """The lines every tiny tokenizer (T5, CLIP, BERT, Gemma) learns from: CORPUS, and per class the
    simple caption and the VLM prompt, and the recipe's visual features."""
    from ..prompts import fill_template, simple_caption

    lines = [ln.strip() for ln in CORPUS.strip().splitlines() if ln.strip()]
    for cat in tokenizer_inputs(recipe)["classes"] or ["lesion"]:
        lines.append(simple_caption(recipe.modality, cat))
        lines.append(fill_template(CAPTION_PROMPT, recipe.modality, cat, recipe.visual_features))
    lines.append(recipe.visual_features)
    return lines


def tokenizer_inputs(recipe) -> dict:
    """Everything the tokenizer build depends on (its cache key)."""
    return {
        "format": TINY_FORMAT,
        "vocab_size": recipe.model.tiny.vocab_size,
        "max_text_tokens": recipe.model.max_text_tokens,
        "modality": recipe.modality,
        "visual_features": recipe.visual_features,
        "classes": class_texts(recipe),
    }


_FITTED_ONLY = ("vae_channels", "latent_channels", "vae_fit_steps", "vae_fit_batch", "vae_fit_crop")


def base_inputs(recipe) -> dict:
    """Everything the whole tiny base depends on (its cache key)."""
    from ..data import read_manifest

    rows = read_manifest(recipe.workdir_path, "train")
    if not rows:
        raise UserError(f"{recipe.workdir_path / 'manifest.csv'} has no train images; the tiny base fits its VAE (or measures its latent scale) on them. "
                        "Rerun `medsynth prepare` on a data set with images.")
    tiny = to_dict(recipe.model.tiny)
    if tiny["autoencoder"] == "taef2":  # settings of the fitted VAE only: changing them must not rebuild
        for k in _FITTED_ONLY:
            tiny.pop(k, None)
    return {
        **tokenizer_inputs(recipe),
        "tiny": tiny,
        "resolution": recipe.model.resolution,
        "seed": recipe.seed,
        "train_sha256": [r.sha256 for r in rows],
    }


def vae_factor(tiny) -> int:
    if tiny.autoencoder == "taef2":
        return TAEF2_FACTOR
    return 2 ** (len(tiny.vae_channels) - 1)


def latent_channels(tiny) -> int:
    """Latent channels of the tiny base's autoencoder (``model.tiny.latent_channels`` is the fitted VAE's)."""
    return TAEF2_LATENT_CHANNELS if tiny.autoencoder == "taef2" else tiny.latent_channels


def dit_patch_size(tiny) -> int:
    """DiT patch size: 2 as PixArt over the fitted VAE's x4 latents, 1 over TAEF2's x8 latents.

    Both give the same token grid (64 px -> 16x16 latents / patch 2 = 8x8 = 8x8 latents / patch 1),
    so attention cost and positional resolution stay as tuned for the CPU demo; patch 2 on TAEF2
    would leave 4x4 tokens for a 64 px image.
    """
    return 1 if tiny.autoencoder == "taef2" else 2


def _check_geometry(recipe) -> None:
    tiny, res = recipe.model.tiny, recipe.model.resolution
    f, p = vae_factor(tiny), dit_patch_size(tiny)
    if res % (p * f):
        what = "the TAEF2 autoencoder" if tiny.autoencoder == "taef2" else f"model.tiny.vae_channels {tiny.vae_channels}"
        raise UserError(
            f"model.resolution {res} does not suit the tiny base: with {what} "
            f"(downsampling x{f}) and DiT patch size {p} it must be a multiple of {p * f}; e.g. --set model.resolution={max(p * f, res // (p * f) * p * f)}")
    if tiny.text_dim % tiny.heads:
        raise UserError(f"model.tiny.text_dim {tiny.text_dim} must be a multiple of model.tiny.heads {tiny.heads} (the tiny T5 uses the same head count)")


# ----------------------------------------------------------------------------- tokenizer


@contextlib.contextmanager
def _sequential_tokenizers():
    # The Unigram trainer's EM sums in parallel threads when allowed, and float sums in a different
    # order can change piece scores; training sequentially makes the files byte-identical per input.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def learn_bpe_merges(words, n_merges: int, end_of_word: str = "") -> list[tuple[str, str]]:
    """Byte-pair merges learned from word counts (``words``: word -> count; the symbols are the
    word's characters, the last one carrying ``end_of_word``, e.g. CLIP's ``</w>``): each step merges
    the most frequent adjacent pair, ties broken by the pair's text.

    Written here, not with tokenizers' BpeTrainer: that trainer breaks ties between equally frequent
    pairs differently in each process (measured: 2 different vocabularies in 3 runs of one recipe),
    so the same recipe built a different tiny tokenizer, and so trained a different model, on every
    run. The corpus is a few hundred words, so the plain loop takes well under a second.
    """
    from collections import Counter

    seqs = {w: [*w[:-1], w[-1] + end_of_word] for w in words if w}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, syms in seqs.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((a, b))
        for w, syms in seqs.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(recipe):
    """A ``T5Tokenizer`` (Unigram, T5's special ids) trained offline on CORPUS + the recipe's texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    inp = tokenizer_inputs(recipe)
    lines = tokenizer_corpus(recipe)

    tok = Tokenizer(models.Unigram())
    # The same pre-tokenizer T5Tokenizer installs, so the learned pieces match how text is split.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = trainers.UnigramTrainer(
        vocab_size=inp["vocab_size"], special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=_ALPHABET, shrinking_factor=0.75, max_piece_length=16, show_progress=False,
    )
    with _sequential_tokenizers():
        tok.train_from_iterator(lines, trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    # The trainer counts words in a hash map whose order changes from process to process, so
    # scores wobble in the last digits (~1e-11) and equal-score pieces swap places. Rounding the
    # scores and ordering ties by the piece text makes ids and files identical for the same inputs.
    rest = _canonical_scores([(p, round(s, 6)) for p, s in vocab[3:]])
    vocab = vocab[:3] + sorted(rest, key=lambda ps: (-ps[1], ps[0]))
    # extra_ids=0: T5's 100 sentinel tokens are for span-corruption pre-training, which never happens here.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=inp["max_text_tokens"])


def _canonical_scores(vocab: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Give the alphabet characters the trainer appends (a ladder of scores 1e-4 apart, in
    hash-map order) their ladder scores in code-point order instead."""
    singles = sorted((s, p) for p, s in vocab if len(p) == 1)
    ladder = singles[:1]
    for s, p in singles[1:]:
        if abs(s - ladder[-1][0] - 1e-4) > 1e-6:
            break
        ladder.append((s, p))
    if len(ladder) < 2:
        return vocab
    scores = sorted((s for s, _ in ladder), reverse=True)
    fixed = dict(zip(sorted(p for _, p in ladder), scores))
    return [(p, fixed.get(p, s)) for p, s in vocab]


def tokenizer_dir(recipe) -> Path:
    """A cached directory holding only ``tokenizer/`` (no VAE fit needed): for the caption stage."""
    key = sha256_json(tokenizer_inputs(recipe))[:16]
    final = recipe.workdir_path / "tiny-base" / f"tokenizer-{key}"
    if (final / "tokenizer" / "tokenizer_config.json").is_file():
        return final
    with _building(final) as tmp:
        build_tokenizer(recipe).save_pretrained(str(tmp / "tokenizer"))
    return final


# ----------------------------------------------------------------------------- model configs


def _norm_groups(channels: list[int]) -> int:
    # GroupNorm needs a group count dividing every width; about 4 channels per group at the
    # narrowest level (Stable Diffusion's VAE has 128 / 32 = 4).
    g = math.gcd(*channels)
    target = max(1, min(32, min(channels) // 4))
    return max(d for d in range(1, g + 1) if g % d == 0 and d <= target)


def vae_config(recipe) -> dict:
    tiny = recipe.model.tiny
    n = len(tiny.vae_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(tiny.vae_channels), layers_per_block=1, act_fn="silu",
        latent_channels=tiny.latent_channels, norm_num_groups=_norm_groups(tiny.vae_channels),
        sample_size=recipe.model.resolution,
        # No self-attention in the mid block: it is fitted on crops and used on whole images, and
        # attention learned on a few tokens does not carry over to more; convolutions do.
        mid_block_add_attention=False,
    )


def transformer_config(recipe) -> dict:
    tiny = recipe.model.tiny
    lat = latent_channels(tiny)
    return dict(
        num_attention_heads=tiny.heads, attention_head_dim=tiny.head_dim,
        in_channels=lat, out_channels=2 * lat,  # learned sigma, as PixArt-alpha
        num_layers=tiny.layers, dropout=0.0, norm_num_groups=32,
        cross_attention_dim=tiny.heads * tiny.head_dim, attention_bias=True,
        sample_size=recipe.model.resolution // vae_factor(tiny), patch_size=dit_patch_size(tiny),
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, caption_channels=tiny.text_dim,
    )


def pixart_init(transformer):
    """Initialise a from-config ``PixArtTransformer2DModel`` as PixArt-alpha's own training code does.

    diffusers builds the model with PyTorch's default layer initialisation, which suits loading
    pretrained weights; training from scratch, PixArt-alpha (like DiT) uses Xavier-uniform linear
    layers with zero biases, N(0, 0.02) timestep and caption MLPs, and zeroes the cross-attention
    output projections and the final layer, so every block starts as the identity plus
    self-attention and the text pathway grows from zero instead of adding noise.
    No diffusers call does this (it has no from-scratch init for this model), hence by hand.
    """
    import torch
    from torch import nn

    with torch.no_grad():
        for m in transformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = transformer.pos_embed.proj.weight  # the patch embedding, initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        t_emb = transformer.adaln_single.emb.timestep_embedder
        for lin in (t_emb.linear_1, t_emb.linear_2, transformer.adaln_single.linear,
                    transformer.caption_projection.linear_1, transformer.caption_projection.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        for block in transformer.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        nn.init.zeros_(transformer.proj_out.weight)
        nn.init.zeros_(transformer.proj_out.bias)
    return transformer


def text_config(recipe, vocab_size: int) -> dict:
    tiny = recipe.model.tiny
    return dict(
        vocab_size=vocab_size, d_model=tiny.text_dim, d_kv=tiny.text_dim // tiny.heads,
        d_ff=int(tiny.text_dim * 2.5), num_layers=tiny.text_layers, num_decoder_layers=tiny.text_layers,
        num_heads=tiny.heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",  # T5 v1.1: wi_0 / wi_1
        tie_word_embeddings=False, is_encoder_decoder=True, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def scheduler_config(recipe) -> dict:
    """PixArt-alpha's scheduler settings with the tiny base's ``prediction_type``.

    Why v-prediction for the tiny base although PixArt-alpha predicts epsilon: with the linear
    beta schedule the last timesteps keep almost no signal (alpha_bar(999) ~ 4e-5), so an epsilon
    target there is nearly the noisy input itself. A large pretrained model gets it exactly right;
    a ~0.3M-parameter DiT trained from scratch for a few minutes does not, and the solver divides
    its small error by sqrt(alpha_bar) into a wrong image (measured on the demo data: x0 error 35x
    the latent variance at t=950, green smudges for samples). The epsilon loss at those steps also
    carries no information about the image, hence none about its class, so the prompt was barely
    used (the demo's synthetic-only classifier at chance). The v target mixes in the clean image
    at every step: same network, same steps, skin-coloured samples that a real-trained classifier
    assigns to the asked-for class 1.5x as often (bench/bench_tiny_conditioning.py). The training
    loop and every diffusers scheduler read this setting from ``scheduler_config.json``.
    """
    return {**PIXART_SCHEDULER, "prediction_type": recipe.model.tiny.prediction_type}


# ----------------------------------------------------------------------------- VAE fit


def load_images(paths, resolution: int):
    """(N, 3, R, R) float in [-1, 1]: shorter side resized to R (bicubic), centre crop (as finetune)."""
    import numpy as np
    import torch
    from ..images import read_image, resize_center_crop

    out = []
    for p in paths:
        img = resize_center_crop(read_image(p), resolution)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def psnr(vae, images, batch: int = 64) -> list[float]:
    """Per-image PSNR (dB, peak = full range) of encode (posterior mean) -> decode, images in [-1, 1]."""
    import torch

    vals = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            vals += (10 * torch.log10(1.0 / mse)).tolist()
    return vals


def fit_vae(vae, images, *, steps: int, batch: int, crop: int, seed: int, lr: float = 2e-3) -> dict:
    """Fit the autoencoder to ``images`` (reconstruction: MSE + 0.5 L1, tiny KL), then centre and scale its latents.

    Hand-written rather than a diffusers training script because none exists as a library call.
    Random crops keep the fit cheap (the network is convolutional, so it applies to whole images)
    and horizontal/vertical flips stretch a few hundred images further.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    r = images.shape[-1]
    crop = r if crop <= 0 or crop >= r else crop
    t0, c0 = time.time(), time.process_time()
    loss_v = float("nan")
    with _threads_for_busy_cpu():
        for _ in console.progress(range(steps), desc="tiny base: fitting VAE", unit="step"):
            loss_v = _fit_step(vae, images, opt, sched, g, batch, crop, r)
    wall, cpu = time.time() - t0, time.process_time() - c0
    vae.eval()
    stats = {"fit_steps": steps, "fit_batch": batch, "fit_crop": crop, "fit_seconds": round(wall, 1),
             "fit_cpu_seconds": round(cpu, 1), "final_loss": round(loss_v, 5)}
    stats.update(_centre_and_scale(vae, images))
    return stats


def _fit_step(vae, images, opt, sched, g, batch: int, crop: int, r: int) -> float:
    import torch

    x = images[torch.randint(0, len(images), (batch,), generator=g)]
    if crop < r:
        i, j = torch.randint(0, r - crop + 1, (2,), generator=g).tolist()
        x = x[:, :, i:i + crop, j:j + crop]
    flip = int(torch.randint(0, 4, (1,), generator=g))
    if flip & 1:
        x = x.flip(3)
    if flip & 2:
        x = x.flip(2)
    post = vae.encode(x).latent_dist
    y = vae.decode(post.sample(generator=g)).sample
    # The KL term only keeps the posterior variance from collapsing to nothing; the latent
    # scale is fixed afterwards by measurement, so it needs no KL pressure.
    loss = (y - x).pow(2).mean() + 0.5 * (y - x).abs().mean() + 1e-6 * post.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


@contextlib.contextmanager
def _threads_for_busy_cpu():
    """One torch thread while the CPU is oversubscribed (load >= cores), the default otherwise.

    Measured on the 2-core build machine under load ~8: the small convolutions of this VAE ran
    20-50x slower with 2 intra-op threads than with 1, because every op waits at a thread
    barrier for a core the other processes hold.
    """
    import torch

    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    old = torch.get_num_threads()
    if busy and old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _centre_and_scale(vae, images) -> dict:
    """Shift latents to zero mean per channel (exactly, inside the 1x1 quant convs) and set scaling_factor = 1/std.

    PixArtAlphaPipeline decodes ``latents / scaling_factor`` and ignores ``shift_factor``, so a mean
    offset cannot be handled by config; folding it into quant_conv / post_quant_conv biases keeps
    decode(encode(x)) unchanged while diffusion sees zero-mean, unit-variance latents.
    """
    import torch

    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
        mean = z.mean(dim=(0, 2, 3))
        c = mean.numel()
        if vae.quant_conv is None or vae.post_quant_conv is None:
            raise RuntimeError("tiny VAE is built with quant convs; cannot centre latents without them")
        vae.quant_conv.bias[:c] -= mean  # first C outputs are the posterior mean
        w = vae.post_quant_conv.weight[:, :, 0, 0]  # (C, C): z' = z - mean  =>  W z + b = W z' + (W mean + b)
        vae.post_quant_conv.bias += w @ mean
        z = z - mean.view(1, c, 1, 1)
        std = float(z.std())
    scale = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=scale)
    return {"latent_mean_removed": [round(float(m), 4) for m in mean], "latent_std": round(std, 4),
            "scaling_factor": round(scale, 6)}


def _centre_and_scale_taef2(vae, images) -> dict:
    """TAEF2's counterpart of ``_centre_and_scale``: per-channel mean into ``config.latent_shift``, 1/std into ``scaling_factor``.

    TAEF2's raw latents are far from centred on medical images (channel means up to +-1.2 against
    a std of ~0.7 on HAM10000 at 64 px), and its decoder starts with a soft clamp, so the offset
    cannot go into a convolution bias; the model subtracts it in ``encode`` and adds it back in
    ``decode`` instead, which ``PixArtAlphaPipeline`` (it ignores ``shift_factor``) also respects.
    """
    import torch

    vae.register_to_config(latent_shift=None, scaling_factor=1.0)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    mean = z.mean(dim=(0, 2, 3))
    std = float((z - mean.view(1, -1, 1, 1)).std())
    scale = 1.0 / max(std, 1e-6)
    vae.register_to_config(latent_shift=[float(m) for m in mean], scaling_factor=scale)
    return {"latent_mean_removed": [round(float(m), 4) for m in mean], "latent_std": round(std, 4),
            "scaling_factor": round(scale, 6)}


# ----------------------------------------------------------------------------- build + cache


@contextlib.contextmanager
def _building(final: Path):
    """Build into a temporary sibling directory and rename it into place only when complete."""
    parent = ensure_dir(final.parent)
    for stale in parent.glob(f".tmp-{final.name}-*"):  # left by a killed build
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a concurrent build may have won the race; its result is the same
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _WRITE_ERRNOS:  # a full disk or a read-only workdir: the user's to fix, no traceback
            raise _os_error(final, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def base_dir(recipe) -> Path:
    """Where the tiny base for this recipe and workspace lives (whether built yet or not)."""
    return recipe.workdir_path / "tiny-base" / sha256_json(base_inputs(recipe))[:16]


def ensure_tiny_base(recipe) -> Path:
    """Return the tiny base directory for this recipe, building it first when it is not cached."""
    final = base_dir(recipe)
    if (final / INFO_FILE).is_file():
        return final
    _check_geometry(recipe)
    console.info(f"tiny base: building {final} (once per data set and settings)")
    with _building(final) as tmp:
        info = build_tiny_base(recipe, tmp)
        atomic_write_json(tmp / INFO_FILE, info)
    how = "pretrained TAEF2 autoencoder (no fit)" if recipe.model.tiny.autoencoder == "taef2" \
        else f"VAE fitted in {info['vae']['fit_seconds']} s"
    console.info(f"tiny base: {how}, train PSNR {info['vae']['train_psnr_db']} dB, "
                 f"scaling_factor {info['vae']['scaling_factor']}")
    return final


def build_tiny_base(recipe, out: Path) -> dict:
    """Build every component, fit the VAE (or take TAEF2), save with PixArtAlphaPipeline.save_pretrained into ``out``."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from ..data import read_manifest

    inputs = base_inputs(recipe)
    tiny = recipe.model.tiny
    tokenizer = build_tokenizer(recipe)
    vocab = len(tokenizer)

    torch.manual_seed(recipe.seed)
    transformer = pixart_init(PixArtTransformer2DModel(**transformer_config(recipe)))
    torch.manual_seed(recipe.seed + 1)
    text_encoder = T5EncoderModel(T5Config(**text_config(recipe, vocab))).eval()
    scheduler = DPMSolverMultistepScheduler(**scheduler_config(recipe))

    rows = read_manifest(recipe.workdir_path, "train")
    images = load_images([r.path for r in rows], recipe.model.resolution)
    if tiny.autoencoder == "taef2":
        from .taef2 import AutoencoderTAEF2

        vae = AutoencoderTAEF2.from_shipped(sample_size=recipe.model.resolution)
        vae_stats = {"autoencoder": "taef2", "fit_steps": 0, "fit_seconds": 0.0}
        vae_stats.update(_centre_and_scale_taef2(vae, images))
        # A spread-out sample of at most 64 images: the PSNR is a sanity check here (nothing was
        # fitted), and TAEF2's full-resolution 64-channel decoder costs ~5x the fitted VAE per image.
        check = images[::max(1, len(images) // 64)][:64]
    else:
        torch.manual_seed(recipe.seed + 2)
        vae = AutoencoderKL(**vae_config(recipe))
        crop = tiny.vae_fit_crop if tiny.vae_fit_crop else recipe.model.resolution
        vae_stats = {"autoencoder": "fitted"}
        vae_stats.update(fit_vae(vae, images, steps=tiny.vae_fit_steps, batch=tiny.vae_fit_batch,
                                 crop=min(crop, recipe.model.resolution), seed=recipe.seed + 3))
        check = images
    vals = psnr(vae, check)
    vae_stats["train_psnr_db"] = round(sum(vals) / len(vals), 2)
    vae_stats["train_psnr_images"] = len(vals)

    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "format": TINY_FORMAT,
        "key": sha256_json(inputs)[:16],
        "inputs": {k: v for k, v in inputs.items() if k != "train_sha256"},
        "n_train_images": len(rows),
        "parameters": {"transformer": count(transformer), "text_encoder": count(text_encoder), "vae": count(vae)},
        "tokenizer_vocab": vocab,
        "vae": vae_stats,
    }
