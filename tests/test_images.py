"""medsynth.images.read_image: every supported flavour becomes 8-bit RGB; broken files raise BadImage."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from medsynth.images import BadImage, read_image

GRAD = np.arange(0, 240, 16, dtype=np.uint8).reshape(3, 5)  # 3 x 5 grey ramp


def _rgb_array(path) -> np.ndarray:
    img = read_image(path)
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


def _colour_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_jpeg(tmp_path):
    src = np.zeros((32, 48, 3), np.uint8)
    src[..., 0] = 200  # flat colour survives JPEG almost exactly
    src[..., 1] = 60
    p = tmp_path / "a.JPG"  # upper-case suffix as cameras write it
    Image.fromarray(src).save(p, quality=95)
    arr = _rgb_array(p)
    assert arr.shape == (32, 48, 3)
    assert np.abs(arr.astype(int) - src).max() <= 3


def test_png_8bit_rgb_is_exact(tmp_path):
    src = _colour_image()
    p = tmp_path / "a.png"
    Image.fromarray(src).save(p)
    assert np.array_equal(_rgb_array(p), src)


def test_png_16bit_grayscale_scaled_by_full_range(tmp_path):
    values = np.array([[0, 257, 1000, 32768], [40000, 65535, 65280, 128]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(values).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # really stored as 16 bit
    arr = _rgb_array(p)
    expected = np.rint(values / 65535 * 255).astype(np.uint8)
    assert np.array_equal(arr[..., 0], expected)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    # Full range, not per-image stretching: a dark 16-bit image stays dark.
    dark = np.full((4, 4), 1000, np.uint16)
    dark[0, 0] = 2000
    Image.fromarray(dark).save(p)
    assert _rgb_array(p).max() == round(2000 / 65535 * 255) == 8


@pytest.mark.parametrize("writer", ["pillow", "tifffile"])
def test_tiff_8bit(tmp_path, writer):
    src = _colour_image()
    p = tmp_path / "a.tif"
    if writer == "pillow":
        Image.fromarray(src).save(p)
    else:
        tifffile.imwrite(p, src, photometric="rgb")
    assert np.array_equal(_rgb_array(p), src)


@pytest.mark.parametrize("writer", ["pillow", "tifffile"])
def test_tiff_16bit_grayscale(tmp_path, writer):
    values = np.array([[0, 257, 32768], [65535, 1000, 12345]], np.uint16)
    p = tmp_path / "g16.tiff"
    if writer == "pillow":
        Image.fromarray(values).save(p)
    else:
        tifffile.imwrite(p, values)
    arr = _rgb_array(p)
    assert np.array_equal(arr[..., 0], np.rint(values / 65535 * 255).astype(np.uint8))


def test_tiff_16bit_rgb_and_channels_first(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 257 * 100, 0
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(p, rgb, photometric="rgb")
    assert _rgb_array(p)[0, 0].tolist() == [255, 100, 0]
    tifffile.imwrite(p, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    assert _rgb_array(p)[0, 0].tolist() == [255, 100, 0]


def test_tiff_signed_and_32bit_use_the_dtype_range(tmp_path):
    """Pillow reads these as int32 mode 'I'; their own dtype's range must be used."""
    p = tmp_path / "ct.tif"
    tifffile.imwrite(p, np.array([[-32768, 0, 32767]], np.int16))  # e.g. CT slices
    assert _rgb_array(p)[0, :, 0].tolist() == [0, 128, 255]
    tifffile.imwrite(p, np.array([[0, 2**31, 2**32 - 1]], np.uint32))
    assert _rgb_array(p)[0, :, 0].tolist() == [0, 128, 255]


def test_tiff_float_only_tifffile_reads(tmp_path):
    src = np.linspace(0, 1, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, src, photometric="rgb")
    arr = _rgb_array(p)
    assert np.array_equal(arr, np.rint(src * 255).astype(np.uint8))
    # Floats outside [0, 1] are min-max scaled per image.
    tifffile.imwrite(p, np.array([[-5.0, 0.0, 5.0]], np.float32))
    assert _rgb_array(p)[0, :, 0].tolist() == [0, 128, 255]


def test_grayscale_rgba_palette_bilevel(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(GRAD, "L").save(p)
    arr = _rgb_array(p)
    assert arr.shape == (3, 5, 3) and all(np.array_equal(arr[..., c], GRAD) for c in range(3))

    rgba = np.zeros((3, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0  # fully transparent
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    assert _rgb_array(p)[0, 0].tolist() == [10, 20, 30]  # colour kept as stored, alpha dropped

    la = Image.fromarray(np.stack([GRAD, np.full_like(GRAD, 128)], -1), "LA")
    p = tmp_path / "la.png"
    la.save(p)
    assert np.array_equal(_rgb_array(p)[..., 1], GRAD)

    src = _colour_image()
    pal = Image.fromarray(src).quantize(16)
    p = tmp_path / "pal.png"
    pal.save(p)
    with Image.open(p) as im:
        assert im.mode == "P"
    assert np.array_equal(_rgb_array(p), np.asarray(pal.convert("RGB")))

    p = tmp_path / "pal.gif"
    pal.save(p)
    assert np.array_equal(_rgb_array(p), np.asarray(pal.convert("RGB")))

    p = tmp_path / "bw.bmp"
    Image.fromarray(GRAD > 100).save(p)
    assert sorted(np.unique(_rgb_array(p)).tolist()) == [0, 255]


def test_webp_and_bmp(tmp_path):
    src = _colour_image()
    for name, kw in (("a.bmp", {}), ("a.webp", {"lossless": True})):
        p = tmp_path / name
        Image.fromarray(src).save(p, **kw)
        assert np.array_equal(_rgb_array(p), src), name


# ----------------------------------------------------------------------------- broken files


def _jpeg_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_colour_image().repeat(8, 0).repeat(8, 1)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(BadImage, match=r"empty file \(0 bytes\)"):
        read_image(p)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n" * 20)
    with pytest.raises(BadImage, match="cannot be decoded .*cannot identify image file"):
        read_image(p)


def test_truncated_jpeg_and_png(tmp_path):
    data = _jpeg_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        read_image(p)
    import io

    buf = io.BytesIO()
    Image.fromarray(_colour_image().repeat(16, 0)).save(buf, format="PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[:-60])
    with pytest.raises(BadImage, match="cannot be decoded"):
        read_image(p)


def test_corrupt_jpeg_header(tmp_path):
    data = bytearray(_jpeg_bytes())
    data[2:40] = b"\x00" * 38  # destroys the segment markers after SOI
    p = tmp_path / "bad.jpg"
    p.write_bytes(bytes(data))
    with pytest.raises(BadImage, match="cannot be decoded"):
        read_image(p)


def test_corrupt_tiff_reports_reason(tmp_path):
    p = tmp_path / "bad.tif"
    p.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(BadImage, match="cannot be decoded"):
        read_image(p)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(BadImage, match=r"cannot be read \(No such file or directory\)"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(BadImage, match="cannot be read"):
        read_image(tmp_path)  # a directory


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def test_decompression_bomb_is_a_bad_image_not_a_crash(tmp_path):
    """A 30000 x 30000 PNG header (900 M pixels) with almost no data: refused before decoding."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b"")
    p = tmp_path / "bomb.png"
    p.write_bytes(png)
    assert p.stat().st_size < 300
    with pytest.raises(BadImage, match="too large to decode safely"):
        read_image(p)


def test_volume_tiff_is_rejected_not_sliced(tmp_path):
    p = tmp_path / "vol.tif"
    tifffile.imwrite(p, np.zeros((5, 16, 16), np.uint8))  # 5 slices of 16 x 16
    with pytest.raises(BadImage, match="multi-page TIFF"):
        read_image(p)
    tifffile.imwrite(p, np.zeros((8, 8, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(BadImage, match="5 channels"):
        read_image(p)


def test_dicom_without_the_extra_is_a_user_error(tmp_path, monkeypatch):
    import sys

    from medsynth.errors import UserError

    monkeypatch.setitem(sys.modules, "pydicom", None)  # import fails as when the extra is absent
    p = tmp_path / "scan.dcm"
    p.write_bytes(b"\x00" * 200)
    with pytest.raises(UserError, match=r"pip install 'medsynth\[dicom\]'"):
        read_image(p)


def test_exif_orientation_is_applied(tmp_path):
    # A 20x10 image whose EXIF tag says "rotate 90° clockwise to display" (orientation 6).
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255  # white band on the stored left edge -> top edge once upright
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = np.asarray(read_image(path))
    assert out.shape == (20, 10, 3)
    assert out[:4].mean() > 200 and out[-4:].mean() < 50
