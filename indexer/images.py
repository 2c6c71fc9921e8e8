"""Decoding photos into RGB images that the detector can use, whatever the file holds.

EXIF orientation is honoured; RGBA / LA / palette images are composited on white; 16- and 32-bit grayscale is
scaled to 8 bits; CMYK and YCbCr are converted. Big JPEGs are decoded with PIL's draft mode (the JPEG decoder
scales by 1/2, 1/4 or 1/8 as it decodes, at a fraction of the cost) to the smallest scale the detector still
sees in full; such an image keeps the file's bytes, so that ``full_resolution`` can decode it again in full when a
face is too small to crop well from the reduced one. Every failure is an :class:`ImageError` whose message is the
reason recorded in the store.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.errors import ImageError

# We enforce our own pixel cap (ingest.max_pixels) before decoding; PIL's own bomb check would fire on a warning.
Image.MAX_IMAGE_PIXELS = None
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass
class DecodedImage:
    """An image ready for detection. ``scale`` maps its pixel coordinates to the original (oriented) image."""

    path: str
    image: Image.Image      # RGB, EXIF orientation applied, maybe reduced by draft mode
    orig_size: tuple[int, int]  # (width, height) of the full-resolution oriented image
    scale: float            # original pixels per decoded pixel (1.0 unless draft mode reduced it)
    encoded: bytes | None = field(default=None, repr=False)  # the file's bytes, kept when draft mode reduced it
    max_pixels: int = 0
    _copies: dict[int, tuple[np.ndarray, float]] = field(default_factory=dict, repr=False)

    def detection_copy(self, max_side: int) -> tuple[np.ndarray, float]:
        """``detection_copy`` of this image, made once: the reader threads make it ahead of the detector."""
        if max_side not in self._copies:
            self._copies[max_side] = detection_copy(self.image, max_side)
        return self._copies[max_side]

    def full_resolution(self) -> DecodedImage:
        """This image decoded at full resolution (itself when it already is). The bytes decoded are the ones the
        reduced image came from (never the file again: it may have changed since)."""
        if self.scale <= 1.0 or self.encoded is None:
            return self
        return decode(io.BytesIO(self.encoded), self.max_pixels, 0, name=self.path)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white (a face on a transparent PNG stays visible)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode(source: str | os.PathLike[str] | bytes | BinaryIO, max_pixels: int, min_side_needed: int = 0,
           name: str | None = None) -> DecodedImage:
    """Open, check, orient and convert one file.

    ``source`` is a path, bytes, or an open binary file (the ingest reads each file once, to hash and decode it);
    ``min_side_needed`` lets draft mode shrink a big JPEG while its long side stays >= that many pixels.
    """
    encoded = bytes(source) if isinstance(source, bytes | bytearray | memoryview) else None
    if encoded is not None:
        source = io.BytesIO(encoded)
    path = name or (str(source) if isinstance(source, str | os.PathLike) else "<stream>")
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"too large: {width}x{height} pixels > ingest.max_pixels {max_pixels}")
            orientation = 1
            try:
                orientation = int(img.getexif().get(0x0112, 1))
            except Exception:  # a broken EXIF block must not cost the photo
                orientation = 1
            if img.format == "JPEG" and min_side_needed > 0:
                # draft() picks the smallest 1/2, 1/4, 1/8 scale that is still >= the requested size.
                long_side = max(width, height)
                if long_side > min_side_needed:
                    ratio = min_side_needed / long_side
                    img.draft("RGB", (max(1, int(width * ratio + 0.5)), max(1, int(height * ratio + 0.5))))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            oriented = ImageOps.exif_transpose(img) if orientation != 1 else img
            rgb = to_rgb(oriented)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("vanished before it could be read") from None
    except PermissionError:
        raise ImageError("unreadable: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt or truncated image: {_first_line(exc)}") from None
    except Exception as exc:  # PIL's plugins raise many kinds (struct.error, EOFError, IndexError...) on bad bytes
        raise ImageError(f"corrupt image: {type(exc).__name__}: {_first_line(exc)}") from None
    orig = (height, width) if orientation in _ROTATED else (width, height)
    scale = orig[0] / rgb.size[0] if rgb.size[0] else 1.0
    if scale > 1.0 and encoded is None:  # reduced from a path or a stream: keep what full_resolution needs
        encoded = _read_all(source)
    return DecodedImage(path=path, image=rgb, orig_size=orig, scale=scale,
                        encoded=encoded if scale > 1.0 else None, max_pixels=max_pixels)


def detection_copy(image: Image.Image, max_side: int) -> tuple[np.ndarray, float]:
    """The uint8 HxWx3 array MTCNN sees (long side at most ``max_side``), and the factor from its pixels to
    ``image``'s pixels.

    Downscaling is PyTorch's antialiased bilinear resize on uint8 (the filter of PIL's ``BILINEAR`` resize, ~8x
    faster here on a 2000 px photo). torch is imported here, not with this module: start-up of a run with nothing
    to decode does not pay for it."""
    w, h = image.size
    if max(w, h) <= max_side:
        return np.asarray(image, dtype=np.uint8), 1.0
    import torch
    import torch.nn.functional as F

    factor = max(w, h) / max_side
    size = (max(1, round(h / factor)), max(1, round(w / factor)))
    with torch.inference_mode():
        pixels = np.array(image, dtype=np.uint8)  # writable, as torch.from_numpy wants
        chw = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # a channels-last view
        small = F.interpolate(chw, size, mode="bilinear", antialias=True)
    return np.ascontiguousarray(small[0].permute(1, 2, 0).numpy()), factor


def _read_all(source: str | os.PathLike[str] | BinaryIO) -> bytes | None:
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as f:
                return f.read()
        source.seek(0)
        return source.read()
    except (OSError, ValueError):
        return None  # full_resolution then falls back to the reduced image


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:160]
