"""Feature extractors for scoring: FID Inception-v3, the workspace's own classifier, timm / HF models.

Every extractor maps a list of PIL RGB images to a float64 array (n, d) and carries an
``id`` plus the path and sha256 of its weight file, which scores.json records.

FID Inception-v3: we use torch-fidelity's ``FeatureExtractorInceptionV3`` (the module
torchmetrics' FID also uses). It reproduces the TensorFlow FID graph, including TF1-style
bilinear resizing to 299 px, which is what makes FID values comparable with published ones
(pytorch-fid resizes with torch's bilinear and differs slightly). It imports without
downloading anything; its constructor would download when given no weight path, and reads a
given path with ``torch.load(weights_only=False)``. So we never hand it a path: we read the
file ourselves with ``torch.load(weights_only=True)``, check the keys, and pass an in-memory
copy of that plain tensor dict. The weights are the standard ``pt_inception-2015-12-05-6726825d.pth``
(pytorch-fid) = ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity): both use the
torchvision Inception key layout.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from . import console
from .errors import UserError
from .workspace import sha256_file

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
FID_ENV = "MEDSYNTH_FID_WEIGHTS"

# Named domain feature extractors for ``score.domain_model``: public classifiers fine-tuned on the
# paper's two data sets (its "KFD" / "HFD"). Both repositories exist on the Hugging Face Hub as
# transformers ViTForImageClassification checkpoints; that the paper used exactly these is what
# docs/paper.md records, which we could not confirm from the paper's text (see docs/evaluation.md).
# loader: "transformers" (AutoModelForImageClassification, features = classifier-head input) or
# "timm" (a timm hub repo, features = pre-logits). Presets load offline, from the local cache only.
DOMAIN_PRESETS: dict[str, dict[str, str]] = {
    "kvasir-vit": {"hf_id": "mmuratarat/kvasir-v2-classifier", "loader": "transformers",
                   "about": "ViT-Base fine-tuned on Kvasir v2; the paper's KFD"},
    "ham10000-vit": {"hf_id": "Anwarkh1/Skin_Cancer-Image_Classification", "loader": "transformers",
                     "about": "ViT-Base fine-tuned on HAM10000 skin lesions; the paper's HFD"},
}


# ----------------------------------------------------------------------------- devices


def resolve_device(spec: str, key: str = "score.device"):
    """'auto' -> cuda / mps / cpu; an unavailable explicit device is a UserError naming ``key``."""
    from .models.loading import resolve_device as shared

    try:
        return shared(spec)
    except UserError as e:  # the shared message names model.device; say which key is ours
        raise UserError(f"{key}: " + str(e).replace("model.device", key)) from None


# ----------------------------------------------------------------------------- timm models


def _cache_hint() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm/transformers
        HF_HUB_CACHE = "~/.cache/huggingface/hub"
    return str(HF_HUB_CACHE)


def create_timm_model(name: str, *, pretrained: bool, pretrained_path: str | None, num_classes: int | None,
                      key: str, image_size: int | None = None):
    """timm.create_model with weights from a local file or the timm/HF cache, offline-aware.

    ``key`` is the recipe prefix ('classify' or 'score.domain') used in error messages.
    A local file goes through timm's loader (safetensors, or torch.load(weights_only=True)),
    which also drops a classifier head whose class count differs.
    """
    import timm

    if not (name.startswith("hf-hub:") or name.startswith("local-dir:") or timm.is_model(name)):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:6]
        hint = f" Similar timm names: {', '.join(close)}." if close else ""
        raise UserError(f"{key}.model: {name!r} is not a timm model name.{hint} See `python -c \"import timm; print(timm.list_models())\"`.")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if image_size is not None and not name.startswith(("hf-hub:", "local-dir:")):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        # Models with a fixed input size (ViTs: position embeddings per patch) must be built for
        # the size we feed; timm resamples pretrained position embeddings to it. CNNs take any size.
        if cfg is not None and getattr(cfg, "fixed_input_size", False) and cfg.input_size[-1] != image_size:
            kwargs["img_size"] = image_size
    overlay = None
    if pretrained and pretrained_path:
        p = Path(pretrained_path).expanduser()
        if not p.is_file():
            raise UserError(f"{key}.pretrained_path: {p} does not exist; give a .safetensors/.pth/.bin weights file for {name!r}")
        overlay = {"file": str(p)}
    try:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
        if not pretrained:
            raise
        if overlay:
            raise UserError(f"{key}.pretrained_path: {overlay['file']} could not be loaded into timm model {name!r} "
                            f"({type(e).__name__}: {str(e)[:300]}); check that the file holds weights for this architecture") from None
        hub_id = None
        try:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(name.split(":", 1)[-1]) if not name.startswith("hf-hub:") else None
            hub_id = getattr(cfg, "hf_hub_id", None) if cfg else name.split(":", 1)[1]
        except Exception:  # only used to improve the message
            pass
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = f"Hugging Face repo {hub_id!r}" if hub_id else "its weights"
        raise UserError(
            f"{key}.model {name!r}: pretrained weights not found in the timm/Hugging Face cache ({_cache_hint()})"
            f"{' and HF_HUB_OFFLINE is set' if offline else ' and they could not be downloaded'} ({type(e).__name__}). "
            f"Fix: download {where} on a machine with internet (`hf download {hub_id or '<repo>'}`) and copy the cache "
            f"(or point HF_HOME at it); or set {key}.pretrained_path to a local .safetensors/.pth file; "
            f"or set {key}.pretrained=false to train from scratch."
            if key == "classify" else
            f"{key}: {name!r}: pretrained weights not found in the timm/Hugging Face cache ({_cache_hint()}) "
            f"({type(e).__name__}). Fix: download {where} on a machine with internet (`hf download {hub_id or '<repo>'}`) "
            "and copy the cache, or set score.domain_pretrained_path to a local weights file, or set score.domain_model: null "
            "to use the workspace's real-only classifier."
        ) from None


def timm_norm(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


GEOMETRIES = ("squash", "crop")


def square_resize(size: int, geometry: str = "squash"):
    """The step that turns any PIL image into a ``size`` x ``size`` square.

    'squash' resizes the whole image (aspect ratio changes, nothing is cut off); 'crop' is
    medsynth.images.resize_center_crop itself, so a classifier with classify.geometry: crop sees
    real images exactly as the generator was fine-tuned on them.
    """
    import functools

    from torchvision import transforms as T

    if geometry == "squash":
        return T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    if geometry == "crop":
        from .images import resize_center_crop

        # functools.partial of a module-level function pickles, so DataLoader workers can use it.
        return T.Lambda(functools.partial(resize_center_crop, resolution=size))
    raise ValueError(f"geometry {geometry!r} is not one of {', '.join(GEOMETRIES)}")


def eval_transform(size: int, mean, std, geometry: str = "squash"):
    from torchvision import transforms as T

    return T.Compose([square_resize(size, geometry), T.ToTensor(), T.Normalize(mean, std)])


# ----------------------------------------------------------------------------- extractors


class Extractor:
    """Maps PIL images to float64 features. Subclasses set id, weights, sha256, dim and _batch()."""

    id: str = ""
    weights: str | None = None
    sha256: str | None = None

    def __init__(self, device):
        self.device = device

    def describe(self) -> dict:
        return {"id": self.id, "weights": self.weights, "sha256": self.sha256}

    def __call__(self, images) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self._batch(images)
        return out.detach().to("cpu", torch.float64).numpy()


class FIDInception(Extractor):
    """2048-d pool3 features of the FID Inception-v3 (torch-fidelity's TF-faithful module)."""

    def __init__(self, weights: Path, device):
        super().__init__(device)
        import torch

        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UserError("FID needs the torch-fidelity package: pip install torch-fidelity "
                            "(or set score.fid: false)") from None
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"score.fid_weights: {weights} could not be read as a PyTorch weights file with "
                            f"torch.load(weights_only=True) ({type(e).__name__}: {str(e)[:200]}); expected {FID_WEIGHTS_NAME}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"score.fid_weights: {weights} does not hold a tensor state dict; expected {FID_WEIGHTS_NAME}")
        # BatchNorm's step counters are bookkeeping only; pytorch-fid's file may or may not carry them.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        expected = {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight"}
        missing = sorted(expected - set(state))
        if missing:
            raise UserError(f"score.fid_weights: {weights} is not the FID Inception-v3 ({FID_WEIGHTS_NAME}): "
                            f"keys {missing} are missing")
        # torch-fidelity loads strictly: give every BatchNorm a step counter (unused in eval).
        for k in _inception_keys():
            if k.endswith("num_batches_tracked"):
                state[k] = torch.tensor(0, dtype=torch.long)
        buf = io.BytesIO()
        torch.save(state, buf)  # a dict of tensors we loaded with weights_only=True: safe for torch-fidelity to unpickle
        buf.seek(0)
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=buf).to(device)
        except RuntimeError as e:
            raise UserError(f"score.fid_weights: {weights} does not fit the FID Inception-v3 architecture "
                            f"({str(e)[:300]}); expected {FID_WEIGHTS_NAME}") from None
        self.id = "fid-inception-v3 (torch-fidelity inception-v3-compat, pool3 2048-d)"
        self.weights = str(weights)
        self.sha256 = sha256_file(weights)
        self.dim = 2048

    def _batch(self, images):
        import torch

        # The module takes uint8 NCHW of any size and resizes to 299 itself (TF1 bilinear);
        # images of different sizes go through in separate groups.
        out = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.size, []).append(i)
        for idx in groups.values():
            arr = np.stack([np.asarray(images[i], dtype=np.uint8) for i in idx])
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(self.device)
            (f,) = self.model(x)
            for j, i in enumerate(idx):
                out[i] = f[j]
        return torch.stack(out)


_INCEPTION_KEYS: list[str] | None = None


def _inception_keys() -> list[str]:
    """State-dict keys of torch-fidelity's Inception (from torchvision's identical layout, no weights)."""
    global _INCEPTION_KEYS
    if _INCEPTION_KEYS is None:
        from torchvision.models import inception_v3

        m = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        _INCEPTION_KEYS = list(m.state_dict().keys())
    return _INCEPTION_KEYS


def fid_weights_path(score_cfg) -> Path:
    """Where the FID Inception weights are; a UserError naming the file and how to get it when absent."""
    given = score_cfg.fid_weights or os.environ.get(FID_ENV)
    how = (f"Download {FID_WEIGHTS_NAME} (the standard FID Inception-v3 weights used by pytorch-fid, torchmetrics and "
           f"torch-fidelity) on a machine with internet from {FID_WEIGHTS_URLS[0]} and point score.fid_weights "
           f"(--set score.fid_weights=PATH) or the environment variable {FID_ENV} at it; or set score.fid: false to skip FID "
           "(KID then uses the domain features).")
    if not given:
        raise UserError(f"score.fid is on but no FID Inception weights are configured. {how}")
    p = Path(given).expanduser()
    if not p.is_file():
        src = "score.fid_weights" if score_cfg.fid_weights else FID_ENV
        raise UserError(f"{src}: {p} does not exist. {how}")
    return p


class TimmFeatures(Extractor):
    """Penultimate (pre-logits) features of a timm model: forward_head(forward_features(x), pre_logits=True)."""

    def __init__(self, model, size: int, mean, std, ident: str, weights: str | None, device, geometry: str = "squash"):
        super().__init__(device)
        self.model = model.to(device).eval()
        self.tf = eval_transform(size, mean, std, geometry)
        self.id = ident
        self.weights = weights
        self.sha256 = sha256_file(weights) if weights and Path(weights).is_file() else None

    def _batch(self, images):
        import torch

        x = torch.stack([self.tf(im) for im in images]).to(self.device)
        f = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return f.flatten(1)


def load_classifier(path: Path):
    """A classifier written by `medsynth classify`: (timm model, metadata dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path} not found")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    try:
        info = json.loads(meta["medsynth"])
    except (KeyError, ValueError):
        raise UserError(f"{path} was not written by `medsynth classify` (no medsynth metadata); re-run it") from None
    # Classifiers written before classify.geometry existed were all trained on squashed images.
    info.setdefault("geometry", "squash")
    if info["geometry"] not in GEOMETRIES:
        raise UserError(f"{path}: its metadata says geometry {info['geometry']!r}, which this medsynth version does not "
                        f"know ({', '.join(GEOMETRIES)}); re-run `medsynth classify` with this version or upgrade medsynth")
    model = create_timm_model(info["model"], pretrained=False, pretrained_path=None,
                              num_classes=len(info["classes"]), key="classify", image_size=int(info["image_size"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), info


def classifier_extractor(path: Path, device) -> TimmFeatures:
    model, info = load_classifier(path)
    # The classifier's features are only meaningful for inputs prepared the way it was trained.
    return TimmFeatures(model, int(info["image_size"]), info["mean"], info["std"],
                        f"workspace classifier {info['model']} (classify/{info.get('train_on', path.parent.name)}, "
                        f"{info['geometry']} inputs)",
                        str(path), device, geometry=info["geometry"])


class HFFeatures(Extractor):
    """Input of the classification head of a transformers image classifier (its penultimate features).

    ``preset``: the DOMAIN_PRESETS name ``ref`` came from; a preset is read from the local Hugging
    Face cache only (``local_files_only``), never downloaded.
    """

    def __init__(self, ref: str, device, preset: str | None = None):
        super().__init__(device)
        kw = {"local_files_only": True, "cache_dir": _hub_cache()} if preset else {}
        try:
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            self.processor = AutoImageProcessor.from_pretrained(ref, **kw)
            self.model = AutoModelForImageClassification.from_pretrained(ref, **kw).to(device).eval()
        except (OSError, ValueError) as e:
            if preset:
                raise _preset_missing(preset, e) from None
            raise UserError(
                f"score.domain_model: {ref!r} could not be loaded as a timm model or a Hugging Face image classifier "
                f"(local directory or hub id; cache {_cache_hint()}; HF_HUB_OFFLINE="
                f"{os.environ.get('HF_HUB_OFFLINE', '')!r}): {str(e)[:300]}. Fix: download it on a machine with internet "
                f"(`hf download {ref}`) and copy the cache, give a local directory, use a preset "
                f"({', '.join(DOMAIN_PRESETS)}), or set score.domain_model: null to use the workspace's real-only "
                "classifier.") from None
        head = getattr(self.model, "classifier", None)
        if head is None:
            raise UserError(f"score.domain_model: {ref!r} has no `classifier` head module, so its penultimate features "
                            "cannot be located; use a timm model or an *ForImageClassification checkpoint")
        self._captured = None
        head.register_forward_pre_hook(self._hook)
        self.id = f"{preset + ' = ' if preset else ''}hf {ref} (classifier-head input)"
        local = Path(ref)
        names = ("model.safetensors", "pytorch_model.bin")
        wfile = next((local / n for n in names if (local / n).is_file()), None) if local.is_dir() else None
        if wfile is None:
            try:
                from huggingface_hub import try_to_load_from_cache

                for n in names:
                    c = try_to_load_from_cache(ref, n, cache_dir=kw.get("cache_dir"))
                    if isinstance(c, str):
                        wfile = Path(c)
                        break
            except Exception:  # only for the provenance record
                wfile = None
        self.weights = str(wfile) if wfile else ref
        self.sha256 = sha256_file(wfile) if wfile else None

    def _hook(self, module, args):
        self._captured = args[0]

    def _batch(self, images):
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        self.model(**inputs)
        f = self._captured
        return f[:, 0] if f.dim() == 3 else f.flatten(1)


def real_classifier_path(workdir: Path) -> Path:
    """The workspace's real-only classifier (default domain model); a UserError naming the fix when absent."""
    path = Path(workdir) / "classify" / "real" / "model.safetensors"
    if not path.is_file():
        raise UserError(f"domain FID needs a domain classifier: {path} not found. Run `medsynth classify --real-only` "
                        "with this recipe first, or set score.domain_model to a timm model name or a Hugging Face "
                        "image classifier (id or local directory).")
    return path


def _hub_cache() -> str:
    # Read at call time (not import time) so that HF_HUB_CACHE / HF_HOME set by the caller count.
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _preset_missing(name: str, err: Exception) -> UserError:
    p = DOMAIN_PRESETS[name]
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return UserError(
        f"score.domain_model: preset {name!r} is the Hugging Face model {p['hf_id']!r}, which is not in the local "
        f"cache {_hub_cache()} ({type(err).__name__}: {first}); presets are loaded offline, from the cache only. "
        f"Fix: on a machine with internet run `hf download {p['hf_id']}` and copy the cache here (or point HF_HOME / "
        f"HF_HUB_CACHE at it), or set score.domain_model to a local directory holding that model, or to null to use "
        "the workspace's real-only classifier.")


def preset_extractor(name: str, device) -> Extractor:
    """The extractor of a DOMAIN_PRESETS entry, read from the local Hugging Face cache only."""
    p = DOMAIN_PRESETS[name]
    if p["loader"] == "transformers":
        return HFFeatures(p["hf_id"], device, preset=name)
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(p["hf_id"], cache_dir=_hub_cache(), local_files_only=True))
    except (OSError, ValueError) as e:
        raise _preset_missing(name, e) from None
    model = create_timm_model(f"local-dir:{local}", pretrained=True, pretrained_path=None, num_classes=None,
                              key="score.domain_model")
    mean, std = timm_norm(model)
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    wf = next((str(local / n) for n in ("model.safetensors", "pytorch_model.bin") if (local / n).is_file()), None)
    return TimmFeatures(model, size, mean, std, f"{name} = timm hf-hub:{p['hf_id']} (pre-logits)", wf, device)


def domain_extractor(score_cfg, workdir: Path, device) -> Extractor:
    """The domain feature extractor for domain FID: the real-only classifier, a preset, or the recipe's model."""
    name = score_cfg.domain_model
    if name is None:
        return classifier_extractor(real_classifier_path(workdir), device)
    if name in DOMAIN_PRESETS:
        return preset_extractor(name, device)
    import timm

    local = Path(name).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        cfg = json.loads((local / "config.json").read_text())
        if "architecture" in cfg:  # a timm checkpoint directory
            model = create_timm_model(f"local-dir:{local}", pretrained=True, pretrained_path=None, num_classes=None,
                                      key="score.domain_model")
            mean, std = timm_norm(model)
            size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
            wf = next((str(local / n) for n in ("model.safetensors", "pytorch_model.bin") if (local / n).is_file()), str(local))
            return TimmFeatures(model, size, mean, std, f"timm {local}", wf, device)
        return HFFeatures(str(local), device)
    if name.startswith("hf-hub:") or timm.is_model(name):
        model = create_timm_model(name, pretrained=True, pretrained_path=score_cfg.domain_pretrained_path,
                                  num_classes=None, key="score.domain_model")
        mean, std = timm_norm(model)
        size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        return TimmFeatures(model, size, mean, std, f"timm {name}", score_cfg.domain_pretrained_path, device)
    return HFFeatures(name, device)


# ----------------------------------------------------------------------------- DINOv2 (FD_DINOv2)

# dgm-eval (Stein et al. 2023, layer6ai-labs/dgm-eval, dgm_eval/models/dinov2.py) feeds DINOv2 a
# PIL image resized to 224 x 224 with bicubic interpolation, scaled to [0, 1] and normalised with
# the ImageNet mean / std, and takes the model's output = the final-norm [CLS] token. We do the
# same with timm's DINOv2 port: eval_transform(224, ImageNet mean/std) and pre-logits features
# of a model with global_pool='token' (the normed [CLS] token). One difference remains: timm
# resamples the 518-px position embeddings to 224 once when loading (bicubic), while the torch
# hub model interpolates them at every forward; values can differ slightly from dgm-eval's.
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


def _dinov2_how(name: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None) or f"timm/{name}"
    return (f"to compute it, run `hf download {hub}` on a machine with internet and copy the Hugging Face cache "
            f"here ({_hub_cache()}), or set score.dinov2_pretrained_path to a local weights file (timm or the "
            f"original DINOv2 .pth) or a timm model directory; score.dinov2_model: null skips FD_DINOv2")


def _model_args(config: Path, architecture: str) -> dict:
    """``model_args`` of a timm config.json beside the weights (timm's hf-hub loader honours them too)."""
    if not config.is_file():
        return {}
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    if cfg.get("architecture") not in (None, architecture):
        return {}
    return dict(cfg.get("model_args") or {})


def find_dinov2_weights(name: str, pretrained_path: str | None) -> Path | None:
    """The local weights of timm model ``name``: score.dinov2_pretrained_path, else the HF cache, else
    torch hub's checkpoint cache; None when there are none. Never downloads anything."""
    from timm.models import get_pretrained_cfg

    if pretrained_path:
        p = Path(pretrained_path).expanduser()
        if p.is_dir():
            p = next((p / n for n in _WEIGHT_NAMES if (p / n).is_file()), p / _WEIGHT_NAMES[0])
        if not p.is_file():
            raise UserError(f"score.dinov2_pretrained_path: {p} does not exist; give the weights file of {name!r} "
                            f"(.safetensors / .pth / .bin) or a directory holding {' or '.join(_WEIGHT_NAMES)}, "
                            "or set it to null to use the Hugging Face / torch hub cache")
        return p
    cfg = get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None)
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for n in _WEIGHT_NAMES:
            c = try_to_load_from_cache(hub, n, cache_dir=_hub_cache())
            if isinstance(c, str) and Path(c).is_file():
                return Path(c)
    url = getattr(cfg, "url", None)
    if url:  # where timm / torch.hub.load_state_dict_from_url put the original DINOv2 checkpoint
        import torch

        c = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if c.is_file():
            return c
    return None


class DINOv2Features(Extractor):
    """The normed [CLS] token of a timm DINOv2 ViT at 224 px (dgm-eval's preprocessing, see above)."""

    def __init__(self, name: str, weights: Path, device):
        super().__init__(device)
        import timm

        arch = name.split(".")[0]
        args = _model_args(weights.parent / "config.json", arch)
        args.update(img_size=DINOV2_SIZE, num_classes=0, global_pool="token")
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **args)
        except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
            raise UserError(f"score.dinov2_model {name!r}: {weights} could not be loaded into it "
                            f"({type(e).__name__}: {str(e)[:300]}); check that the file holds weights of this "
                            "DINOv2 variant (score.dinov2_pretrained_path / score.dinov2_model)") from None
        self.model = model.to(device).eval()
        self.tf = eval_transform(DINOV2_SIZE, IMAGENET_MEAN, IMAGENET_STD)
        self.id = f"dinov2 timm {name} ({DINOV2_SIZE} px, [CLS] {model.num_features}-d)"
        self.weights = str(weights)
        self.sha256 = sha256_file(weights)
        self.dim = model.num_features

    def _batch(self, images):
        import torch

        x = torch.stack([self.tf(im) for im in images]).to(self.device)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def dinov2_extractor(score_cfg, device) -> tuple[Extractor | None, str | None]:
    """(extractor, None) when DINOv2 weights are local, else (None, a note naming how to get them).

    A misconfiguration (not a DINOv2 name, a missing score.dinov2_pretrained_path) is a UserError;
    weights merely absent from the caches are not: FD_DINOv2 is then skipped with the note.
    """
    name = getattr(score_cfg, "dinov2_model", "vit_base_patch14_dinov2.lvd142m")
    path = getattr(score_cfg, "dinov2_pretrained_path", None)
    if not name:
        return None, "FD_DINOv2 not computed: score.dinov2_model is null"
    import timm

    if not timm.is_model(name) or "dinov2" not in name:
        raise UserError(f"score.dinov2_model: {name!r} is not a timm DINOv2 model; use one of "
                        f"{', '.join(timm.list_pretrained('*dinov2*'))}, or null to skip FD_DINOv2")
    weights = find_dinov2_weights(name, path)
    if weights is None:
        return None, f"FD_DINOv2 not computed: no local weights for {name!r} (never downloaded); {_dinov2_how(name)}"
    return DINOv2Features(name, weights, device), None


def extract(extractor: Extractor, load, n: int, batch_size: int, desc: str) -> np.ndarray:
    """Features of items 0..n-1, where load(i) returns a PIL image; batched, with a progress bar."""
    parts = []
    for s in console.progress(range(0, n, batch_size), desc=desc, total=(n + batch_size - 1) // batch_size):
        parts.append(extractor([load(i) for i in range(s, min(n, s + batch_size))]))
    return np.concatenate(parts) if parts else np.zeros((0, 0))
