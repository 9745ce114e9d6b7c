"""The score stage: how close are the synthetic images to the real ones, and are any copies?

Reference sets (the paper's protocol): distribution metrics (FID, KID, domain FID, colour)
compare the synthetic set with the **real test split**; memorization compares every synthetic
image with the **real train split** (the images the generator was fine-tuned on).

- FID (``fid_inception``): Fréchet distance of FID-Inception-v3 pool features (needs the
  standard weights file).
- KID: unbiased MMD^2, cubic polynomial kernel, seeded subsets of min(kid_subset_size, n); on the
  Inception features (``kid_inception_mean``/``_std``), or on the domain features when FID is off
  (``kid_domain_mean``/``_std``): a different number, so it carries a different name.
- Domain FID (the paper's KFD/HFD): Fréchet distance on a domain classifier's penultimate
  features: the workspace's real-only classifier, or score.domain_model.
- Colour: per-channel mean/std of pixels, Wasserstein-1 of the per-channel intensity and of
  the HSV saturation distributions, overall and per class.
- Memorization: cosine similarity (features centred on the real-train mean) of every synthetic
  image to its nearest real train image; fraction above score.memorization_threshold.
- Precision / recall / density / coverage (k-NN manifolds, k = score.prdc_k) on every feature
  space above: ``precision_inception``, ``recall_domain``, ``coverage_dinov2``, ...: fidelity and
  diversity separately, where FID and KID mix them.
- FD_DINOv2 (``fd_dinov2``): Fréchet distance on DINOv2 [CLS] features (Stein et al. 2023), when
  the DINOv2 weights are local (never downloaded); otherwise null with ``fd_dinov2_note``.

Outputs in ``<workdir>/score/``: scores.json, report.md, samples.png, closest_pairs.png,
saturation.png, config.yaml, provenance.json. Every distribution metric is named by the feature
space it was computed in, and ``features`` maps each metric to its extractor's id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import console, metrics
from .data import read_classes, read_manifest
from .images import read_image
from .recipe import Recipe, to_dict
from .workspace import atomic_path, atomic_write_json, atomic_write_text, ensure_dir, sha256_file, write_provenance

PER_CLASS_MIN = 10  # below this many images a class's FID/KID is noise, so it is reported as skipped
THUMB = 256  # colour statistics are computed on images shrunk to this longest side (bounded cost)
N_PAIRS = 8  # closest synthetic/real pairs drawn in closest_pairs.png
PRDC = ("precision", "recall", "density", "coverage")
SPACES = ("inception", "domain", "dinov2")  # feature spaces in the order reports list them
_SPACE_NAME = {"inception": "Inception-v3", "domain": "domain features", "dinov2": "DINOv2"}


# ----------------------------------------------------------------------------- colour


class _Colour:
    """Per-channel pixel sums and 256-bin histograms of R, G, B and HSV saturation."""

    def __init__(self):
        self.sum = np.zeros(3)
        self.sq = np.zeros(3)
        self.n = 0
        self.hist = np.zeros((4, 256))

    def add(self, img) -> None:
        im = img.copy()
        im.thumbnail((THUMB, THUMB))
        rgb = np.asarray(im, dtype=np.float64).reshape(-1, 3) / 255.0
        self.sum += rgb.sum(axis=0)
        self.sq += (rgb ** 2).sum(axis=0)
        self.n += rgb.shape[0]
        u8 = np.asarray(im, dtype=np.uint8).reshape(-1, 3)
        sat = np.asarray(im.convert("HSV"), dtype=np.uint8)[..., 1].ravel()
        for c in range(3):
            self.hist[c] += np.bincount(u8[:, c], minlength=256)
        self.hist[3] += np.bincount(sat, minlength=256)

    def stats(self) -> dict:
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sq / self.n - mean ** 2, 0.0))
        sat = self.hist[3] / self.hist[3].sum()
        return {"mean_rgb": mean.tolist(), "std_rgb": std.tolist(),
                "saturation_mean": float((sat * np.arange(256) / 255.0).sum())}


def _colour_compare(real: _Colour, syn: _Colour) -> dict:
    r, s = real.stats(), syn.stats()
    bw = 1.0 / 255.0  # integer pixel values 0..255 mapped to [0, 1]
    return {
        "real": r, "synthetic": s,
        "mean_abs_diff_rgb": np.abs(np.subtract(r["mean_rgb"], s["mean_rgb"])).tolist(),
        "std_abs_diff_rgb": np.abs(np.subtract(r["std_rgb"], s["std_rgb"])).tolist(),
        "w1_rgb": [metrics.wasserstein1_hist(real.hist[c], syn.hist[c], bw) for c in range(3)],
        "w1_saturation": metrics.wasserstein1_hist(real.hist[3], syn.hist[3], bw),
    }


# ----------------------------------------------------------------------------- passes over images


def _pass(load, labels: list[int], extractors: dict, colours: dict | None, batch_size: int, desc: str) -> dict:
    """One decode of every image: features from every extractor, colour statistics per class."""
    feats = {k: [] for k in extractors}
    n = len(labels)
    for s in console.progress(range(0, n, batch_size), desc=desc, total=(n + batch_size - 1) // batch_size):
        idx = range(s, min(n, s + batch_size))
        imgs = [load(i) for i in idx]
        for k, ex in extractors.items():
            feats[k].append(ex(imgs))
        if colours is not None:
            for i, im in zip(idx, imgs):
                colours.setdefault(labels[i], _Colour()).add(im)
    return {k: np.concatenate(v) for k, v in feats.items()}


# ----------------------------------------------------------------------------- pictures (Pillow only)


def _thumb(img, size: int):
    from PIL import Image, ImageOps

    im = ImageOps.contain(img, (size, size))  # up- or down-scaled, aspect kept
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def _save_png(img, path: Path) -> Path:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=12)


def _sample_grid(names, real_by_class, syn_by_class, load_real, load_syn, path: Path, per: int = 6, size: int = 96):
    from PIL import Image, ImageDraw

    label_w = 150
    rows = len(names)
    W = label_w + 2 * per * size + 20
    H = 24 + rows * (size + 6)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f = _font()
    d.text((label_w, 4), "real (test split)", fill="black", font=f)
    d.text((label_w + per * size + 20, 4), "synthetic", fill="black", font=f)
    for r, name in enumerate(names):
        y = 24 + r * (size + 6)
        d.text((4, y + size // 2 - 6), name[:22], fill="black", font=f)
        for j, i in enumerate(real_by_class.get(r, [])[:per]):
            img.paste(_thumb(load_real(i), size), (label_w + j * size, y))
        for j, i in enumerate(syn_by_class.get(r, [])[:per]):
            img.paste(_thumb(load_syn(i), size), (label_w + per * size + 20 + j * size, y))
    return _save_png(img, path)


def _pairs_png(pairs, load_syn, load_real, path: Path, size: int = 128):
    from PIL import Image, ImageDraw

    n = max(1, len(pairs))
    img = Image.new("RGB", (n * (size + 8) + 8, 2 * size + 50), "white")
    d = ImageDraw.Draw(img)
    f = _font()
    for j, (si, ri, sim) in enumerate(pairs):
        x = 8 + j * (size + 8)
        img.paste(_thumb(load_syn(si), size), (x, 8))
        img.paste(_thumb(load_real(ri), size), (x, 12 + size))
        d.text((x, 2 * size + 18), f"cos {sim:.3f}", fill="black", font=f)
    d.text((8, 2 * size + 34), "top: synthetic, bottom: nearest real train image", fill="black", font=f)
    return _save_png(img, path)


def _saturation_png(names, colours_real, colours_syn, path: Path):
    from PIL import Image, ImageDraw

    pw, ph, bins = 220, 110, 32
    cols = min(4, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    img = Image.new("RGB", (cols * (pw + 20) + 10, rows * (ph + 40) + 30), "white")
    d = ImageDraw.Draw(img)
    f = _font()
    d.text((10, 6), "HSV saturation histograms: real test (blue) vs synthetic (red)", fill="black", font=f)
    for k, name in enumerate(names):
        x0 = 10 + (k % cols) * (pw + 20)
        y0 = 30 + (k // cols) * (ph + 40)
        d.text((x0, y0), name[:30], fill="black", font=f)
        box = (x0, y0 + 16, x0 + pw, y0 + 16 + ph)
        d.rectangle(box, outline=(160, 160, 160))
        curves = []
        for acc, colour in ((colours_real.get(k), (40, 80, 220)), (colours_syn.get(k), (220, 40, 40))):
            if acc is None:
                continue
            h = acc.hist[3].reshape(bins, -1).sum(axis=1)
            curves.append((h / h.sum(), colour))
        top = max((c.max() for c, _ in curves), default=1.0) or 1.0
        for h, colour in curves:
            pts = [(box[0] + (i + 0.5) * pw / bins, box[3] - h[i] / top * (ph - 4)) for i in range(bins)]
            d.line(pts, fill=colour, width=2)
    return _save_png(img, path)


# ----------------------------------------------------------------------------- report


def _fmt(v, digits=4):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _kid_key(scores: dict) -> str:
    """'kid_inception' or 'kid_domain': the KID entries of this scores.json."""
    return "kid_inception" if "kid_inception_mean" in scores else "kid_domain"


_SPACE = {"kid_inception": "Inception-v3 features", "kid_domain": "domain features (not comparable with Inception KID)"}


def summary(scores: dict) -> dict:
    """The headline numbers for ``medsynth score --json``, each named by its feature space."""
    k = _kid_key(scores)
    prdc = [f"{m}_{sp}" for sp in SPACES for m in PRDC]
    keys = ("fid", "fid_inception", f"{k}_mean", f"{k}_std", "domain_fid", "fd_dinov2", *prdc, "prdc_k",
            "memorization_fraction", "n_real", "n_synthetic")
    return {**{key: scores[key] for key in keys if key in scores}, "features": scores.get("features")}


def _report(scores: dict, names: list[str]) -> str:
    L = ["# medsynth score report", "",
         f"Synthetic images: {scores['n_synthetic']}; real reference (test split): {scores['n_real']}; "
         f"real train images (memorization): {scores['n_real_train']}.", "",
         "## Summary", "", "| metric | value | features |", "|---|---|---|"]
    ex = scores["extractors"]
    kk = _kid_key(scores)
    if "fid_inception" in scores:
        L.append(f"| FID (Inception-v3) | {_fmt(scores['fid_inception'])} | {ex['fid_inception']['id']} |")
    L.append(f"| KID on {_SPACE[kk]} (`{kk}`; mean ± std, subset {scores['kid_subset_size']}, "
             f"{scores['kid_subsets']} subsets) | {_fmt(scores[kk + '_mean'])} ± {_fmt(scores[kk + '_std'])} | "
             f"{scores['kid_features']} |")
    L.append(f"| domain FID | {_fmt(scores['domain_fid'])} | {ex['domain']['id']} |")
    dino = ex.get("dinov2")
    L.append(f"| FD_DINOv2 | {_fmt(scores.get('fd_dinov2'))} | {dino['id'] if dino else 'not computed (see below)'} |")
    m = scores["memorization"]
    L.append(f"| memorization (cosine > {m['threshold']}) | {_fmt(scores['memorization_fraction'])} "
             f"({m['n_above']} of {scores['n_synthetic']}) | {m['features']} |")
    if "fid_inception" not in scores:
        L += ["", scores["fid_note"] + "."]
    if scores.get("fd_dinov2_note"):
        L += ["", scores["fd_dinov2_note"] + "."]
    L += ["", "Lower is better for FID, KID, domain FID and FD_DINOv2. Values from different sample sizes are not "
          "comparable (FID is biased upward for small sets).", ""]
    L += [f"## Fidelity and diversity (k-NN manifolds, k = {scores['prdc_k']})", "",
          "Precision and density: are synthetic images where real ones are (fidelity). Recall and coverage: are "
          "the real images' modes reproduced (diversity). 1 is ideal for all four; density can exceed 1.", "",
          "| feature space | precision | recall | density | coverage | features |", "|---|---|---|---|---|---|"]
    for sp in SPACES:
        if f"precision_{sp}" in scores:
            L.append(f"| {_SPACE_NAME[sp]} (`*_{sp}`) | " + " | ".join(_fmt(scores[f"{m}_{sp}"]) for m in PRDC)
                     + f" | {scores['features'][f'precision_{sp}']} |")
    if scores.get("prdc_note"):
        L += ["", scores["prdc_note"]]
    L += ["", "## Per class", ""]
    fid_col = ["FID (Inception-v3)"] if "fid_inception" in scores else []
    gs = kk.split("_", 1)[1]  # the general feature space: PRDC columns of the same space as KID
    pr_cols = [f"{m} ({gs})" for m in PRDC]
    cols = ["class", "n real", "n synthetic", *fid_col, f"KID ({kk})", "domain FID", *pr_cols]
    L += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for n in names:
        pc = scores["per_class"].get(n)
        if pc is None:
            continue
        fid_cell = [_fmt(pc.get("fid_inception"))] if fid_col else []
        L.append("| " + " | ".join([n, str(pc["n_real"]), str(pc["n_synthetic"]), *fid_cell,
                                    _fmt(pc.get(kk + "_mean")), _fmt(pc.get("domain_fid")),
                                    *(_fmt(pc.get(f"{m}_{gs}")) for m in PRDC)]) + " |")
    if scores["per_class_skipped"]:
        L += ["", "Skipped classes:"] + [f"- {k}: {v}" for k, v in scores["per_class_skipped"].items()]
    L += ["", "## Colour fidelity", "",
          "Pixel values in [0, 1]; W1 = Wasserstein-1 distance between the real and synthetic value distributions.", "",
          "| class | mean RGB real | mean RGB synthetic | W1 R/G/B | saturation real / synthetic | W1 saturation |",
          "|---|---|---|---|---|---|"]
    col = scores["colour"]
    for n, c in [("all", col["overall"])] + [(k, col["per_class"][k]) for k in names if k in col["per_class"]]:
        L.append(f"| {n} | {' / '.join(f'{v:.3f}' for v in c['real']['mean_rgb'])} | "
                 f"{' / '.join(f'{v:.3f}' for v in c['synthetic']['mean_rgb'])} | {' / '.join(f'{v:.3f}' for v in c['w1_rgb'])} | "
                 f"{c['real']['saturation_mean']:.3f} / {c['synthetic']['saturation_mean']:.3f} | {c['w1_saturation']:.4f} |")
    L += ["", "![saturation histograms](saturation.png)", "", "## Samples", "", "![samples](samples.png)", "",
          "## Closest synthetic / real-train pairs", "",
          f"Similarity: cosine of {m['features']} features centred on the real-train mean. "
          "Check the top pairs by eye: a near-copy of a training image is a privacy and validity problem.", "",
          "![closest pairs](closest_pairs.png)", "", "| synthetic | nearest real train image | cosine |", "|---|---|---|"]
    for p in m["closest"]:
        L.append(f"| {p['synthetic']} | {p['real']} | {p['similarity']:.4f} |")
    L += ["", "## Feature extractors", ""]
    for k, v in ex.items():
        if v:
            L.append(f"- {k}: {v['id']}; weights {v['weights']}; sha256 {v['sha256']}")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- stage


def run(recipe: Recipe) -> Path:
    """Score the synthetic set against the real one; returns the path of scores.json."""
    from .workspace import require  # a workdir that is not a workspace is refused before any write
    require(recipe)
    from . import synthdata
    from .features import (FIDInception, dinov2_extractor, domain_extractor, fid_weights_path, real_classifier_path,
                           resolve_device)

    s = recipe.score
    wd = recipe.workdir_path
    names = [c["name"] for c in read_classes(wd)]
    # Everything that can be missing is checked before any image is decoded.
    fid_path = fid_weights_path(s) if s.fid else None
    test_rows = read_manifest(wd, "test")
    train_rows = read_manifest(wd, "train")
    samples = synthdata.index_samples(wd, names)
    if s.domain_model is None:
        real_classifier_path(wd)
    device = resolve_device(s.device)
    inception = FIDInception(fid_path, device) if fid_path else None
    domain = domain_extractor(s, wd, device)
    dinov2, dinov2_note = dinov2_extractor(s, device)
    prdc_k = int(getattr(s, "prdc_k", 5))

    idx = {n: i for i, n in enumerate(names)}
    y_real = [idx[r.label] for r in test_rows]
    y_train = [idx[r.label] for r in train_rows]
    y_syn = [x.label for x in samples]
    extractors = {"domain": domain}
    if inception is not None:
        extractors["inception"] = inception
    if dinov2 is not None:
        extractors["dinov2"] = dinov2
    general = "inception" if inception is not None else "domain"  # KID + memorization space
    kid_key = f"kid_{general}"  # KID on another feature space is another number: it gets another name

    def load_real(i):
        return read_image(test_rows[i].path)

    def load_train(i):
        return read_image(train_rows[i].path)

    def load_syn(i):
        return synthdata.read_image(samples[i])

    console.info(f"score: {len(samples)} synthetic vs {len(test_rows)} real test images "
                 f"({', '.join(e.id for e in extractors.values())}); device {device}")
    col_real: dict = {}
    col_syn: dict = {}
    f_real = _pass(load_real, y_real, extractors, col_real, s.batch_size, "real test")
    f_syn = _pass(load_syn, y_syn, extractors, col_syn, s.batch_size, "synthetic")
    f_train = _pass(load_train, y_train, {general: extractors[general]}, None, s.batch_size, "real train")[general]

    fid = metrics.frechet_distance_features(f_syn["inception"], f_real["inception"]) if inception else None
    kid_mean, kid_std, kid_m = metrics.kid(f_syn[general], f_real[general], s.kid_subset_size, s.kid_subsets, recipe.seed)
    domain_fid = metrics.frechet_distance_features(f_syn["domain"], f_real["domain"])
    fd_dinov2 = metrics.frechet_distance_features(f_syn["dinov2"], f_real["dinov2"]) if dinov2 else None
    prdc_scores, prdc_note = {}, None
    for sp in (sp for sp in SPACES if sp in extractors):
        if prdc_k >= min(len(test_rows), len(samples)):
            # Each sample's ball is the distance to its k-th neighbour among the others of its set.
            prdc_note = (f"precision/recall/density/coverage not computed: score.prdc_k = {prdc_k} needs more than "
                         f"{prdc_k} real test and synthetic images, got {len(test_rows)} and {len(samples)}; lower "
                         "score.prdc_k or score more images")
            prdc_scores.update({f"{m}_{sp}": None for m in PRDC})
        else:
            prdc_scores.update({f"{m}_{sp}": v for m, v in metrics.prdc(f_real[sp], f_syn[sp], prdc_k).items()})

    yr, ys = np.asarray(y_real), np.asarray(y_syn)
    per_class, skipped = {}, {}
    for k, name in enumerate(names):
        nr, ns = int((yr == k).sum()), int((ys == k).sum())
        if nr < PER_CLASS_MIN or ns < PER_CLASS_MIN:
            skipped[name] = (f"{nr} real test and {ns} synthetic images; per-class FID/KID needs at least "
                             f"{PER_CLASS_MIN} of each")
            continue
        a, b = {kk: v[ys == k] for kk, v in f_syn.items()}, {kk: v[yr == k] for kk, v in f_real.items()}
        km, ks, _ = metrics.kid(a[general], b[general], s.kid_subset_size, s.kid_subsets, recipe.seed)
        per_class[name] = {"n_real": nr, "n_synthetic": ns, f"{kid_key}_mean": km, f"{kid_key}_std": ks,
                           "domain_fid": metrics.frechet_distance_features(a["domain"], b["domain"])}
        if inception:
            per_class[name]["fid_inception"] = metrics.frechet_distance_features(a["inception"], b["inception"])
        if prdc_k < min(nr, ns):  # class-conditional recall / coverage: which classes lost their modes
            for sp in (sp for sp in SPACES if sp in extractors):
                per_class[name].update({f"{m}_{sp}": v for m, v in metrics.prdc(b[sp], a[sp], prdc_k).items()})
    if not s.per_class:
        per_class, skipped = {}, {n: "score.per_class is false" for n in names}

    tot_r, tot_s = _Colour(), _Colour()
    for acc_all, parts in ((tot_r, col_real), (tot_s, col_syn)):
        for acc in parts.values():
            acc_all.sum += acc.sum
            acc_all.sq += acc.sq
            acc_all.n += acc.n
            acc_all.hist += acc.hist
    colour = {"overall": _colour_compare(tot_r, tot_s),
              "per_class": {names[k]: _colour_compare(col_real[k], col_syn[k]) for k in range(len(names))
                            if k in col_real and k in col_syn}}

    sims, nn = metrics.nearest_cosine(f_syn[general], f_train, center=f_train.mean(axis=0))
    order = np.argsort(-sims)[:N_PAIRS]
    n_above = int((sims > s.memorization_threshold).sum())

    out = ensure_dir(wd / "score")
    real_by_class = {k: [i for i, v in enumerate(y_real) if v == k] for k in range(len(names))}
    syn_by_class = {k: [i for i, v in enumerate(y_syn) if v == k] for k in range(len(names))}
    _sample_grid(names, real_by_class, syn_by_class, load_real, load_syn, out / "samples.png")
    _pairs_png([(int(i), int(nn[i]), float(sims[i])) for i in order], load_syn, load_train, out / "closest_pairs.png")
    _saturation_png(names, col_real, col_syn, out / "saturation.png")

    scores = {
        "fid": fid,  # kept for old readers: as before, the Inception FID or None when score.fid is false
        **({"fid_inception": fid} if inception else {}),
        f"{kid_key}_mean": kid_mean, f"{kid_key}_std": kid_std, "kid_subset_size": kid_m, "kid_subsets": s.kid_subsets,
        "kid_features": extractors[general].id,
        "domain_fid": domain_fid,
        "fd_dinov2": fd_dinov2,
        **({"fd_dinov2_note": dinov2_note} if dinov2 is None else {}),
        **prdc_scores, "prdc_k": prdc_k,
        **({"prdc_note": prdc_note} if prdc_note else {}),
        "features": {**({"fid_inception": inception.id} if inception else {}), kid_key: extractors[general].id,
                     "domain_fid": domain.id, **({"fd_dinov2": dinov2.id} if dinov2 else {}),
                     **{key: extractors[key.rsplit("_", 1)[1]].id for key in prdc_scores},
                     "memorization": extractors[general].id},
        "colour": colour,
        "memorization_fraction": n_above / len(samples),
        "memorization": {
            "threshold": s.memorization_threshold, "n_above": n_above, "features": extractors[general].id,
            "feature_space": general,
            "similarity": "cosine of features centred on the real-train mean",
            "max_similarity": float(sims.max()), "median_similarity": float(np.median(sims)),
            "closest": [{"synthetic": samples[i].key, "real": train_rows[int(nn[i])].path, "similarity": float(sims[i])}
                        for i in order],
        },
        "n_real": len(test_rows), "n_real_train": len(train_rows), "n_synthetic": len(samples),
        "n_real_per_class": {n: int((yr == k).sum()) for k, n in enumerate(names)},
        "n_synthetic_per_class": {n: int((ys == k).sum()) for k, n in enumerate(names)},
        "reference": "real test split (FID, KID, domain FID, FD_DINOv2, precision/recall/density/coverage, colour); "
                     "real train split (memorization)",
        "per_class": per_class, "per_class_skipped": skipped,
        "extractors": {"fid_inception": inception.describe() if inception else None, "domain": domain.describe(),
                       "dinov2": dinov2.describe() if dinov2 else None},
        "seed": recipe.seed,
    }
    if inception is None:
        scores["fid_note"] = ("FID not computed (score.fid: false); KID (kid_domain_mean/kid_domain_std) and memorization "
                              "use the domain features, so they are not comparable with Inception-based values")
    path = atomic_write_json(out / "scores.json", scores)
    atomic_write_text(out / "report.md", _report(scores, names))
    inputs = {"manifest.csv": sha256_file(wd / "manifest.csv"),
              "synthetic/index.json": sha256_file(synthdata.synthetic_dir(wd) / "index.json")}
    for p in synthdata.shard_paths(wd):
        inputs[f"synthetic/{p.name}"] = sha256_file(p)
    for k, e in scores["extractors"].items():
        if e and e.get("sha256"):
            inputs[f"weights/{k}"] = e["sha256"]
    write_provenance(out, recipe, "score", inputs=inputs, config={"score": to_dict(s), "seed": recipe.seed})
    fid_txt = f"FID {fid:.3f}, " if fid is not None else ""
    dino_txt = f"FD_DINOv2 {fd_dinov2:.4g}, " if fd_dinov2 is not None else ""
    pr = (f"precision/recall ({general} features) {prdc_scores[f'precision_{general}']:.3f}/"
          f"{prdc_scores[f'recall_{general}']:.3f}, " if prdc_scores.get(f"precision_{general}") is not None else "")
    console.info(f"score: {fid_txt}KID ({general} features) {kid_mean:.4g} ± {kid_std:.2g}, domain FID {domain_fid:.4g}, "
                 f"{dino_txt}{pr}memorization {n_above}/{len(samples)} -> {path}")
    from .synthesize.card import refresh  # synthetic/README.md quotes the scores of the set they were computed on
    refresh(recipe)
    return path
