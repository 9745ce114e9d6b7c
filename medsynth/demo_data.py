"""Procedural "toy dermoscopy" images: the project's own demo data (numpy + Pillow only).

``medsynth demo`` needs an image-folder data set that ships with the code, costs no download
and carries no third-party licence. This module draws one: a skin-coloured background with
a lesion whose colour, outline, border sharpness and texture depend on the class, plus the
nuisances of real dermoscopy (position, size, rotation, skin tone, hair, the dark circular
rim of the dermoscope, uneven lighting, sensor noise) so that a classifier has something to
learn but cannot read the class off one pixel.

Classes (folder names are valid class names):

- ``toy-nevus``: round or oval, smooth soft border, uniform light-to-medium brown, slightly
  darker centre;
- ``toy-melanoma``: large, asymmetric, notched sharp border, blotches of dark brown, black,
  blue-grey and red;
- ``toy-vascular``: a cluster of red-to-purple lobules with pale septa and a pink halo;
- ``toy-keratosis``: "stuck-on" tan plaque, sharp border, rough cerebriform texture with
  bright cyst-like dots and dark plugs.

Every image is drawn from its own random stream seeded by ``(seed, class index, image index)``,
so the same seed gives byte-identical PNG files (with the same numpy and Pillow), and a larger
``n_per_class`` keeps the first images unchanged. The folder is built beside ``out_dir`` under a
temporary name and renamed into place when complete; ``toy-data.json`` in it records the
settings and file hashes, and a later call with the same settings reuses the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError

GENERATOR_VERSION = 1  # bump when the drawing changes, so stale folders are regenerated
MARKER = "toy-data.json"

RGB = tuple[float, float, float]


# ----------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise field of n x n pixels with features about n/cells wide."""
    low = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    up = np.asarray(Image.fromarray(low, "F").resize((n, n), Image.BICUBIC), dtype=np.float64)
    return (up - up.mean()) / (up.std() + 1e-8)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 as x goes from -width/2 to +width/2 (a soft edge of the given width)."""
    return np.clip(x / max(width, 1e-6) + 0.5, 0.0, 1.0)


def _jitter(rng: np.random.Generator, colour: RGB, amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float64) + rng.normal(0.0, amount, 3), 0, 255)


def _lerp(a: RGB, b: RGB, t: float) -> np.ndarray:
    return np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t


class _Canvas:
    """Normalised coordinates of an n x n grid: x, y in [-1, 1]."""

    def __init__(self, n: int):
        self.n = n
        c = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
        self.x, self.y = np.meshgrid(c, c)

    def window(self, cx: float, cy: float, r: float) -> tuple[tuple[slice, slice], "_Canvas"]:
        """The part of the canvas within the square of half-width r around (cx, cy), as a view."""
        def span(c):
            lo = int(np.clip(np.floor((c - r + 1) / 2 * self.n), 0, self.n))
            return slice(lo, int(np.clip(np.ceil((c + r + 1) / 2 * self.n) + 1, lo, self.n)))
        sl = (span(cy), span(cx))
        sub = object.__new__(_Canvas)
        sub.n, sub.x, sub.y = None, self.x[sl], self.y[sl]
        return sl, sub

    def polar(self, cx: float, cy: float, angle: float, aspect: float) -> tuple[np.ndarray, np.ndarray]:
        """Radius and angle around (cx, cy) in a frame rotated by ``angle`` and squashed by ``aspect``."""
        dx, dy = self.x - cx, self.y - cy
        ca, sa = np.cos(angle), np.sin(angle)
        u = dx * ca + dy * sa
        v = (-dx * sa + dy * ca) / aspect
        return np.hypot(u, v), np.arctan2(v, u)


def _outline(rng: np.random.Generator, phi: np.ndarray, radius: float, ks: range, amp: tuple[float, float]) -> np.ndarray:
    """Boundary radius r(phi) = R (1 + sum_k a_k cos(k phi + p_k)): few small a_k = round, many large = irregular."""
    r = np.ones_like(phi)
    for k in ks:
        r += rng.uniform(*amp) / np.sqrt(k / ks.start) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return radius * np.clip(r, 0.35, None)


def _dots(rng: np.random.Generator, cv: _Canvas, inside: np.ndarray, count: int, radius: tuple[float, float]) -> np.ndarray:
    """Soft round dots placed at random points of the ``inside`` mask; returns their coverage."""
    out = np.zeros((cv.n, cv.n))
    ys, xs = np.nonzero(inside > 0.9)
    if len(xs) == 0:
        return out
    for i in rng.integers(0, len(xs), count):
        cx, cy = cv.x[ys[i], xs[i]], cv.y[ys[i], xs[i]]
        r = rng.uniform(*radius)
        sl, sub = cv.window(cx, cy, 1.5 * r)  # a dot reaches 1.3 r: draw it in a window only
        out[sl] = np.maximum(out[sl], _ramp(r - np.hypot(sub.x - cx, sub.y - cy), r * 0.6))
    return out


def _mix(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return base * (1 - a) + colour * a


# ----------------------------------------------------------------------------- lesions
# Each returns (lesion colour image, coverage in [0, 1]) on the canvas.


def _nevus(rng, cv):
    cx, cy = rng.uniform(-0.25, 0.25, 2)
    rho, phi = cv.polar(cx, cy, rng.uniform(0, np.pi), rng.uniform(0.72, 1.0))
    r = _outline(rng, phi, rng.uniform(0.22, 0.42), range(2, 4), (0.0, 0.05))
    cover = _ramp(r - rho, rng.uniform(0.06, 0.12)) * rng.uniform(0.85, 0.97)
    base = _lerp((160, 104, 70), (104, 64, 42), rng.uniform()) + rng.normal(0, 5, 3)
    # A darker centre and a faint mottle, as in a common naevus.
    shade = 1.0 - 0.18 * np.clip(1 - rho / r, 0, 1) + 0.03 * _smooth_noise(rng, cv.n, 6)
    return np.clip(base * shade[..., None], 0, 255), cover


def _melanoma(rng, cv):
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    rho, phi = cv.polar(cx, cy, rng.uniform(0, np.pi), rng.uniform(0.6, 1.0))
    r = _outline(rng, phi, rng.uniform(0.32, 0.55), range(2, 8), (0.05, 0.16))
    cover = _ramp(r - rho, rng.uniform(0.015, 0.045)) * rng.uniform(0.92, 1.0)
    palette = [(92, 55, 38), (44, 30, 27), (98, 106, 128), (150, 66, 68), (135, 92, 62), (196, 176, 176)]
    weights = np.array([1.0, 1.0, 0.7, 0.5, 0.6, 0.25]) * rng.uniform(0.4, 1.6, len(palette))
    fields = [_smooth_noise(rng, cv.n, int(rng.integers(3, 7))) + np.log(w) for w in weights]
    # Sharp soft-max over noise fields: blotches of one colour with short transitions.
    f = np.stack(fields) * 2.5
    f = np.exp(f - f.max(axis=0))
    f /= f.sum(axis=0)
    colour = np.einsum("kyx,kc->yxc", f, np.asarray([_jitter(rng, p, 8) for p in palette]))
    return colour, cover


def _vascular(rng, cv):
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    spread = rng.uniform(0.14, 0.3)
    cover = np.zeros((cv.n, cv.n))
    # Lobules are mixed over a pale pink so their soft rims read as pale septa, not dark seams.
    colour = np.broadcast_to(_jitter(rng, (214, 130, 128), 8), (cv.n, cv.n, 3)).copy()
    red, purple = (192, 44, 62), (118, 34, 88)
    for _ in range(int(rng.integers(4, 11))):
        lx, ly = cx + rng.normal(0, spread * 0.6), cy + rng.normal(0, spread * 0.6)
        lr = rng.uniform(0.06, 0.14)
        # A lobule reaches at most ~1.35 lr from its centre: draw it in a window only (speed).
        sl, sub = cv.window(lx, ly, 1.6 * lr)
        rho, phi = sub.polar(lx, ly, rng.uniform(0, np.pi), rng.uniform(0.75, 1.0))
        c = _outline(rng, phi, lr, range(2, 4), (0.0, 0.08))
        a = _ramp(c - rho, lr * 0.35)
        col = _lerp(red, purple, rng.uniform()) + rng.normal(0, 8, 3)
        # Darker lobule centres.
        col_img = col * (1 - 0.2 * np.clip(1 - rho / c, 0, 1))[..., None]
        colour[sl] = _mix(colour[sl], col_img, a)
        cover[sl] = np.maximum(cover[sl], a)
    halo = _ramp(spread * 1.6 - np.hypot(cv.x - cx, cv.y - cy), spread) * rng.uniform(0.15, 0.35)
    return colour, np.maximum(cover * 0.95, halo)


def _keratosis(rng, cv):
    cx, cy = rng.uniform(-0.22, 0.22, 2)
    rho, phi = cv.polar(cx, cy, rng.uniform(0, np.pi), rng.uniform(0.6, 0.95))
    r = _outline(rng, phi, rng.uniform(0.25, 0.48), range(3, 6), (0.02, 0.07))
    cover = _ramp(r - rho, rng.uniform(0.012, 0.03)) * rng.uniform(0.93, 1.0)
    base = _lerp((212, 162, 112), (150, 104, 66), rng.uniform()) + rng.normal(0, 6, 3)
    # Cerebriform ridges: fine noise folded into ridges, multiplied onto the waxy tan base.
    fine = _smooth_noise(rng, cv.n, int(rng.integers(10, 16)))
    ridges = 1.0 - 0.28 * (1 - np.abs(np.tanh(fine)))
    colour = base * ridges[..., None]
    inside = cover
    cysts = _dots(rng, cv, inside, int(rng.integers(3, 11)), (0.015, 0.035))
    plugs = _dots(rng, cv, inside, int(rng.integers(3, 11)), (0.015, 0.04))
    colour = _mix(colour, _jitter(rng, (238, 228, 200), 6), cysts)
    colour = _mix(colour, _jitter(rng, (66, 48, 36), 6), plugs)
    return np.clip(colour, 0, 255), cover


CLASSES: dict[str, Callable] = {
    "toy-nevus": _nevus,
    "toy-melanoma": _melanoma,
    "toy-vascular": _vascular,
    "toy-keratosis": _keratosis,
}


# ----------------------------------------------------------------------------- one image


def _skin(rng, cv) -> np.ndarray:
    tone = _lerp((238, 200, 176), (170, 118, 88), rng.uniform() ** 1.3) + rng.normal(0, 5, 3)
    mottle = 1.0 + 0.035 * _smooth_noise(rng, cv.n, 4) + 0.015 * _smooth_noise(rng, cv.n, 16)
    img = tone * mottle[..., None]
    redness = np.clip(_smooth_noise(rng, cv.n, 3), 0, None) * rng.uniform(0, 10)
    img[..., 0] += redness
    img[..., 1:] -= redness[..., None] * 0.5
    return img


def _hair(rng, img: Image.Image) -> None:
    n = img.width
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.choice(4, p=[0.45, 0.25, 0.2, 0.1]))):
        p0, p1, p2 = rng.uniform(-0.1, 1.1, (3, 2)) * n
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # quadratic Bezier
        shade = int(rng.integers(25, 70))
        draw.line([tuple(p) for p in pts.tolist()], fill=(shade + 10, shade, shade - 5),
                  width=max(1, int(round(n / 128 * rng.uniform(0.8, 1.6)))), joint="curve")


def render(class_name: str, index: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw image ``index`` of ``class_name``: (H x W x 3 uint8 RGB, H x W bool lesion mask).

    The mask marks pixels at least half covered by the lesion (before hair and noise); tests
    use it to measure lesion colour.
    """
    names = list(CLASSES)
    if class_name not in CLASSES:
        raise ValueError(f"unknown toy class {class_name!r}; known: {', '.join(names)}")
    rng = np.random.default_rng([seed, names.index(class_name), index])
    ss = 2 if size <= 256 else 1  # draw at 2x and box-filter down: anti-aliased edges
    cv = _Canvas(size * ss)
    skin = _skin(rng, cv)
    colour, cover = CLASSES[class_name](rng, cv)
    img = _mix(skin, colour, cover)
    # Uneven lighting, then the dark circular rim of a contact dermoscope (absent in some).
    g = rng.normal(0, 0.05, 2)
    img *= (1 + g[0] * cv.x + g[1] * cv.y)[..., None]
    rim = rng.uniform(0.95, 1.6)
    ring = np.clip((np.hypot(cv.x, cv.y) - rim + 0.15) / 0.25, 0, 1)
    img *= (1 - rng.uniform(0.3, 0.9) * ring * ring * (3 - 2 * ring))[..., None]
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    _hair(rng, pil)
    pil = pil.resize((size, size), Image.BOX)
    arr = np.asarray(pil, dtype=np.float64) + rng.normal(0, rng.uniform(1.0, 4.0), (size, size, 3))
    mask = np.asarray(Image.fromarray(cover.astype(np.float32), "F").resize((size, size), Image.BOX)) >= 0.5
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8), mask


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # No metadata, fixed compression: the bytes depend on the pixels only.
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------- data set


def _settings(n_per_class: int, size: int, seed: int) -> dict:
    return {"generator": "medsynth.demo_data", "version": GENERATOR_VERSION, "classes": list(CLASSES),
            "n_per_class": n_per_class, "size": size, "seed": seed}


def is_complete(out_dir: Path, n_per_class: int = 60, size: int = 64, seed: int = 0) -> bool:
    """True when ``out_dir`` holds exactly this generator's output for these settings, files intact."""
    try:
        doc = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if doc.get("settings") != _settings(n_per_class, size, seed):
        return False
    for rel, digest in doc.get("files", {}).items():
        try:
            if hashlib.sha256((Path(out_dir) / rel).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return len(doc.get("files", {})) == n_per_class * len(CLASSES)


def generate(out_dir: str | os.PathLike, n_per_class: int = 60, size: int = 64, seed: int = 0) -> Path:
    """Write the toy data set to ``out_dir`` (one sub-folder per class, PNG) and return ``out_dir``.

    Reuses ``out_dir`` when it already holds this output; replaces it when it holds an older or
    differently configured toy data set; refuses to touch a non-empty folder it did not write.
    """
    if n_per_class < 2:
        raise UserError(f"toy data: n_per_class={n_per_class}; need at least 2 images per class (one train, one test)")
    if size < 16:
        raise UserError(f"toy data: size={size}; use at least 16 pixels")
    out_dir = Path(out_dir)
    if is_complete(out_dir, n_per_class, size, seed):
        return out_dir
    if out_dir.exists() and not (out_dir / MARKER).is_file():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise UserError(f"{out_dir} exists and is not a medsynth toy data folder; choose another output folder or empty it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of a run killed mid-way (same parent, our prefix) are ours to remove.
        for old in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise UserError(f"cannot write toy data to {out_dir}: {e.strerror or e}; choose a writable folder") from None
    try:
        files = {}
        for name in CLASSES:
            (tmp / name).mkdir()
            for i in range(n_per_class):
                data = _png_bytes(render(name, i, size, seed)[0])
                rel = f"{name}/{name}-{i:04d}.png"
                (tmp / rel).write_bytes(data)
                files[rel] = hashlib.sha256(data).hexdigest()
        doc = {"settings": _settings(n_per_class, size, seed), "files": files}
        (tmp / MARKER).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent)) / "old"
            os.replace(out_dir, trash)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash.parent, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write toy data to {out_dir}: {e.strerror or e}; choose a writable folder with free space") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


if __name__ == "__main__":  # python -m medsynth.demo_data OUT [N_PER_CLASS [SIZE [SEED]]]
    import sys

    a = sys.argv[1:]
    if not a:
        sys.exit("usage: python -m medsynth.demo_data OUT_DIR [N_PER_CLASS [SIZE [SEED]]]")
    print(generate(Path(a[0]), *(int(x) for x in a[1:4])))
