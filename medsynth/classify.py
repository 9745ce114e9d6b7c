"""The classify stage: train a timm classifier on synthetic / real / mixed images, test on real.

The paper's protocol: ViT-B/16 pretrained on natural images, AdamW, lr 2e-5, 5 epochs,
trained on the synthetic set only and evaluated on the real test split; the real-only
classifier is the reference (and the domain feature extractor of `medsynth score`).

Outputs in ``<workdir>/classify/<train_on>/``: metrics.json, confusion.png, model.safetensors
(metadata: model name, classes, input size, geometry and normalisation), classes.json, config.yaml,
provenance.json. A checkpoint is written after every epoch, so a killed run resumes at the
next epoch (each epoch's shuffle and augmentation are seeded by (seed, epoch), so a resumed
run sees the same batches as an uninterrupted one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import console
from .data import read_classes, read_manifest
from .errors import UserError
from .recipe import Recipe, to_dict
from .workspace import atomic_path, atomic_write_json, ensure_dir, sha256_file, sha256_json, write_provenance

TRAIN_ON = ("synthetic", "real", "mixed")


class _Images:
    """Map-style data set over real files and synthetic shard members: (tensor, label)."""

    def __init__(self, items: list[tuple[str, object, int]], transform):
        self.items = items
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def load(self, i: int):
        from . import synthdata
        from .images import read_image

        kind, ref, _ = self.items[i]
        return read_image(ref) if kind == "real" else synthdata.read_image(ref)

    def __getitem__(self, i: int):
        return self.transform(self.load(i)), self.items[i][2]


def _train_items(recipe: Recipe, train_on: str, names: list[str]) -> tuple[list, dict]:
    from . import synthdata

    wd = recipe.workdir_path
    idx = {n: i for i, n in enumerate(names)}
    items: list[tuple[str, object, int]] = []
    inputs: dict[str, str] = {}
    if train_on in ("real", "mixed"):
        items += [("real", r.path, idx[r.label]) for r in read_manifest(wd, "train")]
    if train_on in ("synthetic", "mixed"):
        samples = synthdata.index_samples(wd, names)
        items += [("synth", s, s.label) for s in samples]
        inputs["synthetic/index.json"] = sha256_file(synthdata.synthetic_dir(wd) / "index.json")
        for p in synthdata.shard_paths(wd):
            inputs[f"synthetic/{p.name}"] = sha256_file(p)
    return items, inputs


def _train_transform(size: int, mean, std, geometry: str = "squash"):
    from torchvision import transforms as T

    from .features import square_resize

    # Flips only: lesions and mucosa have no canonical left/right, and stronger augmentation
    # would change what "trained on synthetic images" measures. The geometry is the same as the
    # test transform's (features.eval_transform), for real and synthetic images alike.
    return T.Compose([square_resize(size, geometry), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def _autocast(device, mode: str):
    import contextlib

    import torch

    if device.type != "cuda" or mode == "no":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return torch.autocast("cuda", dtype=dtype), scaler


def auc_ovr(y: np.ndarray, probs: np.ndarray, names: list[str]) -> tuple[float | None, dict, str | None]:
    """Macro one-vs-rest ROC AUC over the classes present in ``y``.

    With every class present this is sklearn's roc_auc_score(multi_class='ovr', average='macro',
    labels=all classes). A class absent from the test labels has no defined AUC: it is left out
    of the average and named in the returned note (instead of sklearn's ValueError).
    Returns (auc or None, per-class AUC, note or None).
    """
    from sklearn.metrics import roc_auc_score

    k = len(names)
    present = sorted(set(int(v) for v in y))
    per = {names[c]: float(roc_auc_score((y == c).astype(int), probs[:, c])) for c in present} if len(present) >= 2 else {}
    absent = [names[c] for c in range(k) if c not in present]
    if len(present) < 2:
        return None, per, (f"AUC undefined: the test labels hold only {len(present)} class(es) "
                           f"({', '.join(names[c] for c in present) or 'none'})")
    if not absent and k > 2:
        auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    else:
        auc = float(np.mean(list(per.values())))
    note = None
    if absent:
        note = (f"classes absent from the real test split, left out of auc_macro_ovr and f1_macro: {', '.join(absent)} "
                f"(AUC over {len(present)} of {k} classes)")
    return auc, per, note


def _balanced_accuracy(fn, y, pred) -> float:
    import warnings

    with warnings.catch_warnings():
        # Predictions of a class absent from the test split are simply wrong answers here; the
        # absent class itself is reported in metrics["note"].
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(fn(y, pred))


def compute_metrics(y: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """Classification metrics on the real test split (scikit-learn)."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)

    k = len(names)
    pred = probs.argmax(axis=1)
    present = sorted(set(int(v) for v in y))
    auc, auc_per, note = auc_ovr(y, probs, names)
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    counts = np.bincount(y, minlength=k)
    out = {
        "f1_macro": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "balanced_accuracy": _balanced_accuracy(balanced_accuracy_score, y, pred),
        "auc_macro_ovr": auc,
        "accuracy": float(accuracy_score(y, pred)),
        "n_test": int(len(y)),
        "chance": {"balanced_accuracy": 1.0 / max(1, len(present)), "auc_macro_ovr": 0.5,
                   "accuracy_majority_class": float(counts.max() / max(1, len(y)))},
        "per_class": {names[c]: {"precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]),
                                 "support": int(sup[c]), "auc_ovr": auc_per.get(names[c])} for c in range(k)},
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
        "classes": names,
    }
    if note:
        out["note"] = note
    return out


def confusion_png(cm: list[list[int]], names: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    m = np.asarray(cm, dtype=np.float64)
    k = len(names)
    cell = 64 if k <= 10 else 40
    font = ImageFont.load_default(size=12) if hasattr(ImageFont, "load_default") else None
    labels = [n if len(n) <= 22 else n[:21] + "…" for n in names]
    left = 12 + 7 * max(len(s) for s in labels)
    top = 48
    legend = "rows: true class, columns: predicted; shade = fraction of the row"
    W = max(left + k * cell + 20, 7 * max(len(title), len(legend)) + 20)
    H = top + k * cell + 7 * max(len(s) for s in labels) + 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=font)
    d.text((10, 24), legend, fill=(90, 90, 90), font=font)
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    for i in range(k):
        d.text((6, top + i * cell + cell // 2 - 6), labels[i], fill="black", font=font)
        for j in range(k):
            v = frac[i, j]
            shade = int(255 - 200 * v)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            d.text((x0 + 6, y0 + cell // 2 - 6), str(int(m[i, j])), fill="white" if v > 0.6 else "black", font=font)
    # column labels, written vertically
    for j, s in enumerate(labels):
        txt = Image.new("RGB", (7 * len(s) + 8, 16), "white")
        ImageDraw.Draw(txt).text((2, 1), s, fill="black", font=font)
        rot = txt.rotate(90, expand=True)
        img.paste(rot, (left + j * cell + cell // 2 - 8, top + k * cell + 6))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _save_model(model, path: Path, info: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"medsynth": json.dumps(info, sort_keys=True)})


def run(recipe: Recipe, train_on: str | None = None) -> Path:
    """Train on ``train_on`` (default recipe.classify.train_on), evaluate on the real test split.

    Returns the path of metrics.json.
    """
    from .workspace import require  # a workdir that is not a workspace is refused before any write
    require(recipe)
    import torch
    from torch.utils.data import DataLoader

    from .features import create_timm_model, eval_transform, resolve_device, timm_norm

    c = recipe.classify
    train_on = train_on or c.train_on
    if train_on not in TRAIN_ON:
        raise UserError(f"classify.train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    wd = recipe.workdir_path
    classes = read_classes(wd)
    names = [x["name"] for x in classes]
    items, inputs = _train_items(recipe, train_on, names)
    test_rows = read_manifest(wd, "test")
    if not test_rows:
        raise UserError(f"{wd / 'manifest.csv'} has no test images; re-run `medsynth prepare` (data.test_fraction > 0)")
    if not items:
        raise UserError(f"no training images for classify --{train_on}-only in {wd}")
    inputs["manifest.csv"] = sha256_file(wd / "manifest.csv")
    device = resolve_device(c.device, "classify.device")
    config = {"classify": to_dict(c), "train_on": train_on, "seed": recipe.seed, "classes": names}
    fp = sha256_json({"config": config, "inputs": inputs})

    torch.manual_seed(recipe.seed)
    model = create_timm_model(c.model, pretrained=c.pretrained, pretrained_path=c.pretrained_path,
                              num_classes=len(names), key="classify", image_size=c.image_size).to(device)
    # Only now, with the weights found, does the stage touch the workspace: missing weights leave nothing behind.
    out_dir = ensure_dir(wd / "classify" / train_on)
    mean, std = timm_norm(model)
    train_ds = _Images(items, _train_transform(c.image_size, mean, std, c.geometry))
    test_ds = _Images([("real", r.path, names.index(r.label)) for r in test_rows],
                      eval_transform(c.image_size, mean, std, c.geometry))
    opt = torch.optim.AdamW(model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
    autocast, scaler = _autocast(device, c.mixed_precision)

    ckpt = out_dir / "checkpoint.pt"
    start = 0
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # a checkpoint from an older version or a damaged file: start over
            console.warn(f"{ckpt} unreadable ({type(e).__name__}); training from the start")
            state = None
        if state and state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["epoch"]) + 1
            console.info(f"classify: resuming after epoch {start} of {c.epochs} from {ckpt}")
        elif state:
            console.info(f"classify: {ckpt} belongs to other settings or data; training from the start")

    counts = np.bincount([lab for _, _, lab in items], minlength=len(names))
    console.info(f"classify --{train_on}: {c.model} ({'pretrained' if c.pretrained else 'from scratch'}) on "
                 f"{len(items)} images, {c.epochs} epoch(s), device {device}; test: {len(test_ds)} real images")
    loss_log = []
    for epoch in range(start, c.epochs):
        model.train()
        torch.manual_seed(recipe.seed * 1000 + epoch)  # augmentation / dropout of this epoch
        gen = torch.Generator().manual_seed(recipe.seed * 1000 + epoch)
        loader = DataLoader(train_ds, batch_size=c.batch_size, shuffle=True, generator=gen,
                            num_workers=c.num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        total, n = 0.0, 0
        bar = console.progress(loader, desc=f"epoch {epoch + 1}/{c.epochs}", total=len(loader))
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / n:.4f}")
        loss_log.append({"epoch": epoch + 1, "train_loss": total / max(1, n)})
        console.info(f"epoch {epoch + 1}/{c.epochs}: train loss {total / max(1, n):.4f}")
        with atomic_path(ckpt) as tmp:
            torch.save({"fingerprint": fp, "epoch": epoch, "model": model.state_dict(),
                        "optimizer": opt.state_dict()}, tmp)

    model.eval()
    probs, ys = [], []
    loader = DataLoader(test_ds, batch_size=c.batch_size, shuffle=False, num_workers=c.num_workers)
    with torch.inference_mode():
        for x, y in console.progress(loader, desc="test", total=len(loader)):
            with autocast:
                logits = model(x.to(device))
            probs.append(torch.softmax(logits.float(), dim=1).cpu().double().numpy())
            ys.append(y.numpy())
    p = np.concatenate(probs)
    y = np.concatenate(ys).astype(np.int64)
    metrics = compute_metrics(y, p, names)
    metrics.update({
        "train_on": train_on, "model": c.model, "pretrained": c.pretrained, "epochs": c.epochs,
        "n_train": len(items), "n_train_per_class": {names[i]: int(v) for i, v in enumerate(counts)},
        "train_loss": loss_log, "evaluated_on": "real test split",
        "n_test_per_class": {names[i]: int(v) for i, v in enumerate(np.bincount(y, minlength=len(names)))},
    })
    if metrics.get("note"):
        console.warn(metrics["note"])

    # geometry travels with the weights: score's domain features and the curation judge must
    # prepare images the way this model was trained (features.load_classifier reads it back).
    info = {"model": c.model, "classes": names, "image_size": c.image_size, "mean": list(mean), "std": list(std),
            "geometry": c.geometry, "train_on": train_on, "fingerprint": fp}
    _save_model(model, out_dir / "model.safetensors", info)
    atomic_write_json(out_dir / "classes.json", {"classes": [{"index": i, "name": n} for i, n in enumerate(names)]})
    confusion_png(metrics["confusion_matrix"], names, out_dir / "confusion.png",
                  f"{c.model} trained on {train_on}, tested on real")
    metrics_path = atomic_write_json(out_dir / "metrics.json", metrics)
    write_provenance(out_dir, recipe, "classify", inputs=inputs, config=config,
                     extra={"train_on": train_on, "model_sha256": sha256_file(out_dir / "model.safetensors")})
    ckpt.unlink(missing_ok=True)
    console.info(f"classify --{train_on}: F1 {metrics['f1_macro']:.3f}, balanced accuracy {metrics['balanced_accuracy']:.3f}, "
                 f"AUC {metrics['auc_macro_ovr'] if metrics['auc_macro_ovr'] is None else round(metrics['auc_macro_ovr'], 3)} "
                 f"-> {metrics_path}")
    return metrics_path
