"""The 'stats' captioner: a weight-free, deterministic description from measured image features.

For users without a GPU-sized VLM and for the CPU demo. It answers the same prompt as the VLM
("describe the ... image of {category} using colour, shape, texture, ...") from numbers:

- segmentation: the main region is what differs most from the image border (the background
  in dermoscopy and many endoscopy frames): per-pixel CIELAB distance to the border's median
  colour, Otsu threshold, the largest (centre-weighted) connected component, holes filled;
- colours: every pixel named after the nearest entry of a small colour-name table in CIELAB
  (a perceptual space, so 'brown' vs 'red' follows what people see), reported by share;
- size (area fraction), shape (elongation from second moments), symmetry (overlap with the
  mirror images about the principal axes), border regularity (solidity = area / convex hull
  area) and sharpness (how much of the colour step happens within a few pixels of the edge);
- brightness (mean L*), contrast (CIELAB distance region vs background), texture (mean local
  standard deviation of L*).

Hand-written on purpose: scikit-image would do the colour conversion and regionprops, but it
is not a dependency of medsynth, and these few measures are short with numpy/scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

STATS_VERSION = 1  # bump when the wording or the measures change (captions are then redone)
_MAX_SIDE = 256

# Colour names and a representative sRGB value each (named in CIELAB below).
_COLOURS = {
    "black": (25, 22, 22),
    "dark grey": (75, 72, 72),
    "grey": (135, 132, 132),
    "white": (240, 238, 236),
    "dark brown": (80, 50, 35),
    "brown": (135, 85, 55),
    "reddish brown": (160, 75, 62),
    "light brown": (180, 130, 95),
    "tan": (205, 165, 130),
    "beige": (225, 205, 180),
    "light pink": (240, 200, 200),
    "pink": (225, 155, 160),
    "salmon": (235, 135, 110),
    "red": (195, 45, 50),
    "dark red": (120, 25, 35),
    "dark reddish brown": (120, 50, 40),
    "crimson": (175, 40, 88),
    "magenta": (200, 70, 160),
    "purple": (115, 55, 110),
    "mauve": (175, 115, 145),
    "blue-grey": (105, 115, 140),
    "blue": (50, 80, 170),
    "orange": (225, 130, 45),
    "yellow": (225, 205, 80),
    "pale yellow": (235, 225, 160),
    "green": (70, 140, 75),
}


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8 or [0,1] floats, ... x 3) to CIELAB (D65), float64."""
    x = np.asarray(rgb, dtype=np.float64)
    if x.max(initial=0) > 1.0:
        x = x / 255.0
    lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps = 216 / 24389
    f = np.where(xyz > eps, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


_NAMES = list(_COLOURS)
_TABLE = rgb_to_lab(np.array([_COLOURS[n] for n in _NAMES], dtype=np.float64))


def name_colours(lab: np.ndarray) -> np.ndarray:
    """Index into the colour table of the nearest name for each Lab pixel (N x 3)."""
    # Lightness counts half: shading within one coloured structure should not flip its name.
    w = np.array([0.5, 1.0, 1.0])
    x, t = lab.reshape(-1, 3) * w, _TABLE * w
    d = (x * x).sum(1)[:, None] - 2.0 * x @ t.T + (t * t).sum(1)[None, :]  # squared distances, vectorised
    return d.argmin(1)


def otsu(values: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between))])


@dataclass
class Features:
    area: float            # region area / image area
    elongation: float      # sqrt of the ratio of the principal second moments (1 = round)
    symmetry: float        # mean overlap with the mirror images about both principal axes
    solidity: float        # area / convex hull area
    sharpness: float       # colour step within 3 px of the edge / full region-background step
    colours: list[tuple[str, float]]  # region colour names with their share, largest first
    background: str        # most common colour name outside the region
    brightness: float      # mean L* of the image (0-100)
    contrast: float        # CIELAB distance between region and background means
    texture: float         # mean local std of L* inside the region
    found: bool            # a distinct region was segmented


def _prepare(img) -> np.ndarray:
    from PIL import Image

    img = img.convert("RGB")
    if max(img.size) > _MAX_SIDE:
        s = _MAX_SIDE / max(img.size)
        img = img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _segment(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    h, w, _ = lab.shape
    fw = max(2, round(0.06 * min(h, w)))
    frame = np.zeros((h, w), bool)
    frame[:fw, :] = frame[-fw:, :] = frame[:, :fw] = frame[:, -fw:] = True
    border = lab[frame]
    # Dermoscopes often leave a black vignette in the corners: it is not the skin background.
    lit = border[border[:, 0] > 15]
    bg = np.median(lit if len(lit) > 0.2 * len(border) else border, axis=0)
    raw = np.sqrt(((lab - bg) ** 2).sum(-1))
    dist = ndimage.uniform_filter(raw, size=5)  # smoothed for segmentation; edges are measured on raw
    t = otsu(dist.ravel())
    fg = (dist > t) & (lab[..., 0] > 8)
    fg = ndimage.binary_opening(fg, iterations=2)
    labels, n = ndimage.label(fg)
    if n == 0 or t < 6.0:  # nothing stands out from the background by a visible colour step
        return np.ones((h, w), bool), raw, False
    idx = np.arange(1, n + 1)
    areas = ndimage.sum(fg, labels, idx)
    cy, cx = np.array(ndimage.center_of_mass(fg, labels, idx)).T
    off = np.hypot((cy - h / 2) / (h / 2), (cx - w / 2) / (w / 2)) / np.sqrt(2)
    best = int(idx[np.argmax(areas * (1.0 - 0.6 * off))])
    mask = ndimage.binary_fill_holes(labels == best)
    if mask.sum() < 0.005 * h * w:
        return np.ones((h, w), bool), raw, False
    return mask, raw, True


def _shape(mask: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    c = pts.mean(0)
    cov = np.cov((pts - c).T) if len(pts) > 2 else np.eye(2)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 1e-9)
    elong = float(np.sqrt(evals[1] / evals[0]))
    # Mirror about each principal axis and measure the overlap with the original region.
    rot = np.rint((pts - c) @ evecs).astype(np.int64)
    span = int(np.abs(rot).max()) + 1

    def keys(p):  # one integer per (rounded) pixel position, for set overlap with numpy
        return np.unique((p[:, 0] + span) * (2 * span + 1) + (p[:, 1] + span))

    grid = keys(rot)
    overlaps = [np.intersect1d(grid, keys(rot * flip), assume_unique=True).size / max(1, grid.size)
                for flip in (np.array([1, -1]), np.array([-1, 1]))]
    sym = float(np.mean(overlaps))
    try:
        from scipy.spatial import ConvexHull

        edge = mask & ~ndimage.binary_erosion(mask)
        ey, ex = np.nonzero(edge)
        hull = ConvexHull(np.stack([ex, ey], 1).astype(np.float64))
        solidity = float(min(1.0, mask.sum() / max(hull.volume, 1.0)))
    except Exception:  # degenerate (a line of pixels): qhull refuses; treat as regular
        solidity = 1.0
    return elong, sym, solidity


def measure(img) -> Features:
    """Measure the features of one PIL image (deterministic)."""
    rgb = _prepare(img)
    lab = rgb_to_lab(rgb)
    mask, dist, found = _segment(lab)
    flat = lab.reshape(-1, 3)
    m = mask.ravel()
    names = name_colours(flat)
    reg = np.bincount(names[m], minlength=len(_NAMES)) / max(1, m.sum())
    order = np.argsort(-reg, kind="stable")
    colours = [(_NAMES[i], float(reg[i])) for i in order if reg[i] >= 0.12][:3] or [(_NAMES[order[0]], float(reg[order[0]]))]
    if found and (~m).any():
        bgc = np.bincount(names[~m], minlength=len(_NAMES))
        background = _NAMES[int(bgc.argmax())]
        contrast = float(np.linalg.norm(flat[m].mean(0) - flat[~m].mean(0)))
        inner = mask & ~ndimage.binary_erosion(mask, iterations=3)
        outer = ndimage.binary_dilation(mask, iterations=3) & ~mask
        deep = ndimage.binary_erosion(mask, iterations=3)
        step = (dist[deep].mean() if deep.any() else dist[mask].mean()) - dist[~mask].mean()
        edge_step = dist[inner].mean() - dist[outer].mean() if inner.any() and outer.any() else 0.0
        sharp = float(np.clip(edge_step / step, 0, 1)) if step > 1e-6 else 0.0
        elong, sym, solidity = _shape(mask)
    else:
        background, contrast, sharp = _NAMES[order[0]], 0.0, 0.0
        elong, sym, solidity = 1.0, 1.0, 1.0
    L = lab[..., 0]
    mean = ndimage.uniform_filter(L, size=5)
    var = np.maximum(ndimage.uniform_filter(L * L, size=5) - mean * mean, 0)
    texture = float(np.sqrt(var)[mask].mean())
    return Features(area=float(mask.mean()), elongation=elong, symmetry=sym, solidity=solidity,
                    sharpness=sharp, colours=colours, background=background,
                    brightness=float(L.mean()), contrast=contrast, texture=texture, found=found)


def _pick(value: float, table: list[tuple[float, str]], last: str) -> str:
    for limit, word in table:
        if value < limit:
            return word
    return last


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def describe(f: Features, prefix: str) -> str:
    """Plain-language caption starting with ``prefix``."""
    brightness = _pick(f.brightness, [(35, "dark"), (55, "moderately lit")], "bright")
    texture = _pick(f.texture, [(2.0, "smooth and homogeneous"), (3.5, "finely mottled")], "coarse and heterogeneous")
    main = f.colours[0][0]
    others = [c for c, _ in f.colours[1:]]
    colour = main if not others else f"mostly {main} with {_and(others)} areas"
    if not f.found:
        return (f"{prefix}. The image is {brightness} and fairly uniform, without one distinct region, "
                f"{colour}. Its texture is {texture}.")
    size = _pick(f.area, [(0.03, "tiny"), (0.12, "small"), (0.35, "medium-sized"), (0.65, "large")],
                 "extensive")
    shape = _pick(f.elongation, [(1.3, "round"), (1.8, "oval")], "elongated")
    symmetry = _pick(f.symmetry, [(0.7, "asymmetric"), (0.83, "slightly asymmetric")], "symmetric")
    border = _pick(f.solidity, [(0.85, "irregular, notched"), (0.93, "slightly irregular")], "smooth, regular")
    edge = _pick(f.sharpness, [(0.28, "blurred"), (0.4, "fairly clear")], "sharp")
    contrast = _pick(f.contrast, [(10, "low"), (25, "moderate")], "high")
    bg = "" if f.background == main else f", on {_a(f.background)} background"
    # Most telling first: a caption cut at a sentence boundary to fit the token limit keeps colour and shape.
    return (f"{prefix}. {_a(size).capitalize()}, {shape}, {symmetry} region, {colour}{bg}. "
            f"Its border is {border} and {edge}, with {contrast} contrast. "
            f"Its texture is {texture}; the image is {brightness}.")


def caption(img, prefix: str) -> str:
    return describe(measure(img), prefix)
