"""Encoded bytes -> a 2-D grayscale array, with every size limit checked from the header.

JPEG, PNG, TIFF, BMP, WebP and the other still formats Pillow reads; DICOM (see
``dicom.py``); OpenCV as the fallback for formats Pillow does not know, and for the
pixels of a whole baseline gray JPEG once Pillow has checked its header (the same
pixels, sooner). What comes out keeps its own size and depth; ``preprocess`` makes
the model input of it.
"""
from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .settings import MAX_IMAGE_PIXELS

# OpenCV's own pixel limit (read once, on its first decode) guards the fallback
# decoder for formats Pillow does not know; Pillow's header is checked before that.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
import cv2  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

from .dicom import decode_dicom, is_dicom  # noqa: E402
from .errors import ImageTooLargeError, InvalidImageError, UnsupportedImageError  # noqa: E402
from .film_facts import NO_FACTS, FilmFacts  # noqa: E402
from .pixels import stretch  # noqa: E402


class RequestBudget:
    """What one request may spend on reading its files: decoded pixels across all of them,
    and wall-clock time. A batch's files draw on it from the threads that decode them; a
    file past either limit is refused on its own, and the files read before it stand.

    The time is checked before each file is read, so a request ends within the budget and
    one file's decoding (at most ``max_pixels`` of one film) after it.
    """

    def __init__(self, max_pixels: int, seconds: float):
        self.max_pixels, self.seconds = max_pixels, seconds
        self._deadline = time.monotonic() + seconds
        self._spent = 0
        self._lock = threading.Lock()

    def spend(self, pixels: int) -> None:
        with self._lock:
            if self._spent + pixels > self.max_pixels:
                raise ImageTooLargeError(
                    f"Reading this file would take the request past its budget of {self.max_pixels / 1e6:g} "
                    "megapixels across its files; send it in another request.")
            self._spent += pixels

    def check_time(self) -> None:
        if time.monotonic() > self._deadline:
            raise ImageTooLargeError(f"The request used up its {self.seconds:g} s before this file was read; "
                                     "send it in another request.")


@dataclass(frozen=True)
class DecodeLimits:
    """What we refuse before spending memory on a file; ``budget``, what one request may spend in all."""

    max_pixels: int = MAX_IMAGE_PIXELS
    min_side: int = 64
    max_aspect: float = 4.0
    budget: RequestBudget | None = None

    def check(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise ImageTooLargeError(self.too_many_pixels(width * height))
        if min(width, height) < self.min_side:
            raise InvalidImageError(
                f"The image is {width}x{height} pixels: too small to be a chest X-ray "
                f"(at least {self.min_side} pixels a side)."
            )
        if max(width, height) > self.max_aspect * min(width, height):
            raise InvalidImageError(
                f"The image is {width}x{height} pixels: too elongated to be a chest X-ray "
                f"(at most {self.max_aspect:g}:1)."
            )
        if self.budget is not None:
            self.budget.spend(width * height)

    def too_many_pixels(self, pixels: int | None) -> str:
        size = f" ({pixels / 1e6:.0f} megapixels)" if pixels else ""
        return f"The image is too large{size}; the limit is {self.max_pixels / 1e6:.0f} megapixels."


class Film(NamedTuple):
    pixels: np.ndarray  # 2-D, any depth
    facts: FilmFacts  # from a DICOM header; empty for other formats


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None) -> np.ndarray:
    """Decode encoded image bytes into a 2-D grayscale array, EXIF orientation applied."""
    return decode_film(data, limits, min_side).pixels


def decode_film(data: bytes, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None) -> Film:
    """The pixels and, for DICOM, the film's facts (age, view, body part).

    The header is read first (Pillow parses it lazily), so a decompression bomb is
    refused before its pixels are allocated. 16-bit data stays 16-bit.

    ``min_side``: the caller shrinks the image to this square anyway, so a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
    this long: a 2000 px film costs a quarter of the work. A JPEG already that small
    (the 224 px training copies) decodes exactly as without it.
    """
    if not data:
        raise InvalidImageError("The file is empty.")
    if is_dicom(data):
        return Film(*decode_dicom(data, limits.check, limits.max_pixels))
    return Film(_decode_pixels(data, limits, min_side), NO_FACTS)


def _decode_pixels(data: bytes, limits: DecodeLimits, min_side: int | None) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageTooLargeError(limits.too_many_pixels(None)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return _decode_with_opencv(data, limits)
    with image:
        limits.check(*image.size)
        try:
            frames = getattr(image, "n_frames", 1)
        except Exception:  # a broken frame table is a broken file
            raise InvalidImageError("The image file is corrupt.") from None
        if frames > 1:
            raise InvalidImageError(
                f"The file holds {frames} frames (an animation or a multi-page file); "
                "upload a single still image."
            )
        kind = image.format or "image"
        try:
            full_size = image.size
            if min_side and kind == "JPEG":
                image.draft(image.mode, (min_side, min_side))  # same colours, fewer pixels
            array = _decode_gray_jpeg(data, image, full_size) if kind == "JPEG" else None
            if array is not None:
                return array
            image.load()
            if image.getexif().get(ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            array = _pil_to_gray(image)
        except (OSError, ValueError, SyntaxError, EOFError):
            raise InvalidImageError(
                f"The {kind} file is truncated or corrupt and cannot be decoded."
            ) from None
    return array  # the size was checked from the header; a 90-degree turn does not change it


ORIENTATION = 0x0112  # the EXIF tag; 1 is upright

#: libjpeg's DCT scales as OpenCV asks for them (gray output, EXIF left to us)
_REDUCED = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _decode_gray_jpeg(data: bytes, image: Image.Image, full_size: tuple[int, int]) -> np.ndarray | None:
    """The pixels Pillow would give for a whole, upright, baseline gray JPEG, decoded by
    OpenCV (the same libjpeg arithmetic, faster, as Pillow feeds its decoder in blocks);
    None for any other JPEG, which Pillow decodes.

    Pillow refuses a truncated file; OpenCV would fill the missing rows with gray. In a
    baseline gray JPEG an FF D9 pair can only be the end-of-image marker (the scan's FF
    bytes are followed by 00 or a restart marker), so a file that ends with it is whole.
    """
    if (image.mode != "L" or image.info.get("progressive") or image.info.get("progression")
            or not data.endswith(b"\xff\xd9") or "exif" in image.info and image.getexif().get(ORIENTATION, 1) != 1):
        return None
    width, height = image.size  # after ``draft``: each side divided by its DCT scale, rounded up
    scale = next((s for s in _REDUCED if (-(-full_size[0] // s), -(-full_size[1] // s)) == (width, height)), None)
    if scale is None:
        return None
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    return array if array is not None and array.shape == (height, width) else None  # else Pillow says why


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.array(image, dtype=np.uint16)
    if image.mode in ("I", "F"):  # 32-bit integer or float: no fixed range to divide by
        return stretch(np.array(image, dtype=np.float64))
    if image.mode not in ("L",):
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def _decode_with_opencv(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Formats Pillow does not know but OpenCV does (EXR, HDR, PFM...)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        array = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    except cv2.error:
        array = None
    if array is None:
        raise UnsupportedImageError(
            "The file is not an image in a format we can read (JPEG, PNG, TIFF, BMP, WebP...)."
        )
    limits.check(array.shape[1], array.shape[0])
    return array
