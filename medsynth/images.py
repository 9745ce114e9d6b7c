"""Reading medical images of many flavours into 8-bit RGB.

Conversions (documented in docs/data.md):
- grayscale (L, I;16, I, F) is replicated to three channels;
- 16-bit and 32-bit integer data are scaled by the dtype's full range (65535 -> 255; signed
  data from the minimum, -32768 -> 0), not stretched per image, so intensities stay comparable
  between images; TIFFs other than 8-bit and unsigned 16-bit are read with tifffile, which
  keeps the stored dtype (Pillow widens them to int32);
- float data are clipped to [0, 1] when they lie there, else min-max scaled per image;
- an alpha channel is dropped (colour values kept as stored);
- palette / CMYK / YCbCr images are converted to RGB by Pillow;
- a multi-page TIFF (a volume or stack) is refused rather than cut to its first page;
- DICOM (.dcm) needs the optional extra ``pip install 'medsynth[dicom]'``; its VOI LUT /
  windowing is applied, then min-max scaled to 8 bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import UserError

# A truncated file must be reported as unreadable, not half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An image that cannot be decoded; message says why."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        lo = 0 if info.min >= 0 else info.min
        scaled = (arr.astype(np.float64) - lo) / float(info.max - lo) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise BadImage("contains NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    if hi == lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(np.rint((arr - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.size == 0:
        raise BadImage("holds no pixel data")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channels-first TIFF
    if arr.ndim != 3:
        raise BadImage(f"has {arr.ndim} dimensions; expected a 2D image (volumes are not supported)")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.shape[-1] != 3:
        raise BadImage(f"has {arr.shape[-1]} channels; expected 1, 3 or 4")
    return Image.fromarray(_to_uint8(np.ascontiguousarray(arr)), "RGB")


def _read_dicom(path: Path) -> Image.Image:
    try:
        import pydicom
    except ImportError:
        raise UserError(f"{path}: DICOM input needs the optional extra: pip install 'medsynth[dicom]'") from None
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
        try:
            from pydicom.pixels import apply_voi_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_voi_lut
        if getattr(ds, "PhotometricInterpretation", "") in ("MONOCHROME1", "MONOCHROME2"):
            arr = apply_voi_lut(arr, ds).astype(np.float64)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                arr = arr.max() - arr
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    except UserError:
        raise
    except Exception as e:  # pydicom raises many types for broken files
        raise BadImage(f"DICOM could not be decoded ({type(e).__name__}: {e})") from None
    return _array_to_rgb(np.asarray(arr))


def _read_tiff(path: Path) -> Image.Image:
    import tifffile

    try:
        arr = np.asarray(tifffile.imread(str(path)))
    except Exception as e:  # tifffile raises many types for broken files
        raise BadImage(f"cannot be decoded by Pillow or tifffile ({type(e).__name__}: {e})") from None
    return _array_to_rgb(arr)


def read_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully and return an 8-bit RGB image; raise BadImage if it cannot."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return _read_dicom(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("is an empty file (0 bytes)")
        with Image.open(path) as img:
            img.load()
            if img.format == "TIFF" and getattr(img, "n_frames", 1) > 1:
                # Pillow would silently return the first page of a stack or volume.
                raise BadImage(f"is a multi-page TIFF ({img.n_frames} pages, e.g. a volume or stack); "
                               "medsynth reads single 2D images: save the slice you want as its own file")
            # Apply an EXIF orientation tag the way every viewer does (camera / phone images).
            oriented = ImageOps.exif_transpose(img)
            if oriented is not None and oriented is not img:
                img = oriented
            mode = img.mode
            if mode in ("RGB",):
                return img.copy()
            if mode in ("L", "P", "PA", "LA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                if mode in ("LA", "PA"):
                    img = img.convert("RGBA")
                return img.convert("RGB") if img.mode != "RGBA" else Image.fromarray(np.asarray(img)[..., :3], "RGB")
            if path.suffix.lower() in (".tif", ".tiff") and mode not in ("I;16", "I;16L", "I;16B"):
                # Pillow widens signed 16-bit and unsigned 32-bit TIFF samples to int32 mode "I"
                # (wrapping values >= 2**31), losing the dtype whose full range we scale by.
                return _read_tiff(path)
            arr = np.asarray(img)
            if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr.astype(np.uint16)  # Pillow widens 16-bit PNG to int32 mode "I"
            return _array_to_rgb(arr)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"is too large to decode safely ({e}); downscale or tile it first") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        # Pillow cannot read some 16-bit / multi-channel / float TIFFs: try tifffile.
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                import tifffile

                arr = np.asarray(tifffile.imread(str(path)))
            except Exception:  # tifffile cannot read it either: report Pillow's reason below
                arr = None
            if arr is not None and arr.size:
                return _array_to_rgb(arr)
        if isinstance(e, OSError) and e.errno is not None:  # the file system, not the decoder
            raise BadImage(f"cannot be read ({e.strerror})") from None
        msg = str(e) or type(e).__name__
        raise BadImage(f"cannot be decoded ({msg})") from None


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side resized to ``resolution`` (bicubic), then the centre square cut out.

    The one geometry every generative stage uses (tiny VAE fit, fine-tuning), so the model
    sees training images exactly as the autoencoder was fitted on them.
    """
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))
