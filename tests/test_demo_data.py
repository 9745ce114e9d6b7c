"""The procedural toy dermoscopy data set (medsynth.demo_data)."""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from medsynth import demo_data
from medsynth.errors import UserError
from medsynth.recipe import CLASS_NAME_RE


@pytest.fixture(scope="module")
def full_set(tmp_path_factory):
    """The demo's default set (4 classes x 60, 64 px), generated once; its CPU time is kept."""
    out = tmp_path_factory.mktemp("toy") / "data"
    t0 = time.process_time()  # CPU time: stable on a shared machine, unlike wall time
    demo_data.generate(out, n_per_class=60, size=64, seed=0)
    return out, time.process_time() - t0


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_classes_size_and_mode(full_set):
    root, _ = full_set
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert classes == sorted(demo_data.CLASSES)
    assert len(classes) >= 4
    for c in classes:
        assert CLASS_NAME_RE.match(c), c
        pngs = sorted((root / c).glob("*.png"))
        assert len(pngs) == 60
        for p in pngs[:5]:
            with Image.open(p) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".data.tmp-")], "temporary folder left behind"


def test_generation_is_fast(full_set):
    _, seconds = full_set
    # About 2-3 s of CPU on this project's machines; the bound leaves room for a busy shared CI box
    # (contention inflates even CPU time) but catches a real slowdown.
    assert seconds < 6, f"generating 4x60 toy images took {seconds:.1f} s of CPU time"


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = demo_data.generate(tmp_path / "a", n_per_class=3, size=48, seed=7)
    b = demo_data.generate(tmp_path / "b", n_per_class=3, size=48, seed=7)
    c = demo_data.generate(tmp_path / "c", n_per_class=3, size=48, seed=8)
    files = _files(a)
    assert files == _files(b) == _files(c)
    assert len([f for f in files if f.endswith(".png")]) == 3 * len(demo_data.CLASSES)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    pngs = [f for f in files if f.endswith(".png")]
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in pngs)
    with Image.open(a / pngs[0]) as im:
        assert im.size == (48, 48)


def test_more_images_keep_the_first_ones(tmp_path):
    small = demo_data.generate(tmp_path / "small", n_per_class=2, size=32, seed=3)
    big = demo_data.generate(tmp_path / "big", n_per_class=4, size=32, seed=3)
    for f in _files(small):
        if f.endswith(".png"):
            assert (small / f).read_bytes() == (big / f).read_bytes()


def test_reuse_regenerate_and_refuse(tmp_path):
    out = tmp_path / "toy"
    demo_data.generate(out, n_per_class=2, size=32)
    png = out / "toy-nevus" / "toy-nevus-0000.png"
    stamp = png.stat().st_mtime_ns
    os.utime(png, ns=(stamp - 10**9, stamp - 10**9))
    demo_data.generate(out, n_per_class=2, size=32)
    assert png.stat().st_mtime_ns == stamp - 10**9, "complete output was rewritten instead of reused"

    original = png.read_bytes()
    png.write_bytes(b"damaged")
    assert not demo_data.is_complete(out, n_per_class=2, size=32)
    demo_data.generate(out, n_per_class=2, size=32)
    assert png.read_bytes() == original

    demo_data.generate(out, n_per_class=3, size=32)  # other settings replace the set
    marker = json.loads((out / demo_data.MARKER).read_text())
    assert marker["settings"]["n_per_class"] == 3
    assert len(list((out / "toy-nevus").glob("*.png"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".toy.tmp-")]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a medsynth toy data folder"):
        demo_data.generate(foreign, n_per_class=2, size=32)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="n_per_class"):
        demo_data.generate(tmp_path / "x", n_per_class=1)


N_MEASURED = 40  # images per class re-drawn for the statistics (all 60 would double the test time)


@pytest.fixture(scope="module")
def measured(full_set):
    """Per class: the files' pixels and the renderer's lesion masks for the first N_MEASURED images."""
    root, _ = full_set
    out = {}
    for c in demo_data.CLASSES:
        rows = []
        for i in range(N_MEASURED):
            with Image.open(root / c / f"{c}-{i:04d}.png") as im:
                pixels = np.asarray(im)
            drawn, mask = demo_data.render(c, i, 64, 0)
            assert np.array_equal(drawn, pixels), f"{c} {i}: file differs from the renderer"
            assert mask.sum() > 20, f"{c} {i}: lesion too small to measure"
            rows.append((pixels, mask))
        out[c] = rows
    return out


def _hsv(pixels):
    return np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float64)


def _lesion_colour(pixels, mask):
    """Mean hue (degrees, circular mean), saturation, brightness and brightness spread of the lesion."""
    hsv = _hsv(pixels)
    hue = np.degrees(np.angle(np.exp(1j * hsv[..., 0][mask] / 255 * 2 * np.pi).mean()))
    v = hsv[..., 2][mask]
    return [hue, hsv[..., 1][mask].mean(), v.mean(), v.std()]


def _separation(a, b):
    """|difference of class means| in units of the pooled within-class SD, per column."""
    return np.abs(a.mean(0) - b.mean(0)) / np.sqrt((a.var(0) + b.var(0)) / 2)


def test_classes_differ_in_lesion_colour_more_than_within(measured):
    feats = {c: np.array([_lesion_colour(p, m) for p, m in rows]) for c, rows in measured.items()}
    names = ["hue", "saturation", "brightness", "brightness spread"]
    seps = {(a, b): _separation(feats[a], feats[b]) for a, b in itertools.combinations(feats, 2)}
    for (a, b), sep in seps.items():
        # Some lesion colour statistic separates every pair by more than 1.5 within-class SDs...
        assert sep.max() > 1.5, f"{a} vs {b}: separations {dict(zip(names, sep.round(2)))}"
    # ...but no single statistic separates every pair: the task is not one threshold.
    for k, name in enumerate(names):
        assert min(sep[k] for sep in seps.values()) < 1.5, f"{name} alone separates all classes"


def test_within_class_variation(measured):
    for c, rows in measured.items():
        masks = np.array([m for _, m in rows])
        ys, xs = np.array([np.argwhere(m).mean(0) for m in masks]).T
        area = masks.mean((1, 2))
        assert xs.std() > 2 and ys.std() > 2, f"{c}: lesions do not move"
        assert area.std() / area.mean() > 0.15, f"{c}: lesion size hardly varies"
        skin = [_hsv(p)[..., 2][~m].mean() for p, m in rows]
        assert np.std(skin) > 6, f"{c}: background brightness SD {np.std(skin):.1f}"
        flat = np.array([p for p, _ in rows], dtype=np.float64).reshape(len(rows), -1)
        sq = (flat ** 2).sum(1)
        dists = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * flat @ flat.T, 0, None) / flat.shape[1])  # RMS pixel distance
        assert dists[~np.eye(len(rows), dtype=bool)].min() > 5, f"{c}: two images are near copies"


def test_prepare_accepts_the_toy_set(full_set, cli, tmp_path):
    root, _ = full_set
    r = cli("prepare", "demo", "--set", f"data.root={root}", "--set", f"workdir={tmp_path / 'ws'}", "--json", "-q")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["classes"] == {c: {"train": 48, "test": 12} for c in demo_data.CLASSES}
