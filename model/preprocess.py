"""The one preprocessing path shared by training, evaluation and the web app.

bytes --decode_image--> 2-D array (uint8/uint16/float, any size)
      --preprocess----> float32 (size, size) in [0, 1], what the network sees

The geometry is a recorded parameter because the dataset's training copies were
squashed to 224x224 (aspect ratio lost) while real uploads keep their own aspect
ratio: the crop must be chosen so that an upload looks like what the model was
trained on. ``PreprocessParams`` is stored in every checkpoint and compared on load.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

# OpenCV's own pixel limit (read once, on its first decode) guards the fallback
# decoder for formats Pillow does not know; Pillow's header is checked before that.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(40_000_000))
import cv2  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

#: Bump when the arithmetic below changes in a way that changes model inputs.
PREPROCESS_VERSION = 1

GEOMETRIES = ("squash", "center_crop")
EQUALIZATIONS = ("none", "hist", "clahe")
INTERPOLATIONS = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


class ImageError(ValueError):
    """An input that cannot be turned into a model input; the message is for users."""


class UnsupportedImageError(ImageError):
    """Not an image in any format we read (HTTP 415)."""


class InvalidImageError(ImageError):
    """An image format we read, but a file or picture we refuse (HTTP 400)."""


class ImageTooLargeError(ImageError):
    """More pixels than the configured limit: a decompression bomb or a scan (HTTP 413)."""


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that decides the model input; recorded in the checkpoint.

    geometry: ``squash`` resizes the whole image to a square (as the training copies
    were made); ``center_crop`` cuts the largest centred square first (the seed's way).
    prefilter_size: before the final cubic resize, shrink with area averaging to this
    square size, so a 2500 px upload is low-passed the way the 224 px training copies
    were instead of being aliased by a single cubic step. ``None`` disables it.
    """

    size: int = 64
    geometry: str = "squash"
    interpolation: str = "cubic"
    prefilter_size: int | None = 224
    equalize: str = "none"
    version: int = PREPROCESS_VERSION

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {self.geometry!r}; expected one of {GEOMETRIES}")
        if self.equalize not in EQUALIZATIONS:
            raise ValueError(f"unknown equalization {self.equalize!r}; expected one of {EQUALIZATIONS}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if not isinstance(self.size, int) or not 8 <= self.size <= 1024:
            raise ValueError(f"size must be an integer in [8, 1024], got {self.size!r}")
        if self.prefilter_size is not None and self.prefilter_size < self.size:
            raise ValueError("prefilter_size must be at least size")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessParams":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {sorted(unknown)}")
        params = cls(**data)
        if params.version != PREPROCESS_VERSION:
            raise ValueError(
                f"preprocessing version {params.version} is not this code's version {PREPROCESS_VERSION}"
            )
        return params


@dataclass(frozen=True)
class DecodeLimits:
    """What we refuse before spending memory on a file."""

    max_pixels: int = 40_000_000
    min_side: int = 64
    max_aspect: float = 4.0


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode encoded image bytes into a 2-D grayscale array, EXIF orientation applied.

    The header is read first (Pillow parses it lazily), so a decompression bomb is
    refused before its pixels are allocated. 16-bit data stays 16-bit.
    """
    if not data:
        raise InvalidImageError("The file is empty.")
    if data[128:132] == b"DICM":
        from .dicom import decode_dicom

        return decode_dicom(data, lambda w, h: _check_size(w, h, limits))
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageTooLargeError(_too_many_pixels_message(None, limits)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return _decode_with_opencv(data, limits)
    with image:
        width, height = image.size
        _check_size(width, height, limits)
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
            image.load()
            array = _pil_to_gray(ImageOps.exif_transpose(image))
        except (OSError, ValueError, SyntaxError, EOFError):
            raise InvalidImageError(
                f"The {kind} file is truncated or corrupt and cannot be decoded."
            ) from None
    return array  # the size was checked from the header; a 90-degree turn does not change it


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Any decoded array (gray, RGB or RGBA; 8-bit, 16-bit or float) to float32 gray.

    Integer data is divided by its type's maximum; the absolute scale does not matter
    downstream because ``preprocess`` stretches its output to [0, 1].
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3:
        if array.shape[2] not in (3, 4):
            raise InvalidImageError(f"Expected 1, 3 or 4 channels, got {array.shape[2]}.")
        array = array[:, :, :3]
    elif array.ndim != 2:
        raise InvalidImageError(f"Expected a 2-D or 3-D image array, got shape {array.shape}.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        scale = float(np.iinfo(array.dtype).max)
        array = array.astype(np.float32) / scale
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise InvalidImageError("The image holds non-finite values.")
    else:
        raise InvalidImageError(f"Unsupported pixel type {array.dtype}.")
    if array.ndim == 3:
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2GRAY)
    return array


def preprocess(
    image: bytes | np.ndarray,
    params: PreprocessParams = PreprocessParams(),
    limits: DecodeLimits = DecodeLimits(),
) -> np.ndarray:
    """Encoded bytes or a decoded array -> the float32 (size, size) model input in [0, 1]."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = decode_image(bytes(image), limits)
    gray = to_gray_float(image)
    height, width = gray.shape
    if min(height, width) < 2:
        raise InvalidImageError("The image is too small.")
    if params.geometry == "center_crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        gray = gray[top : top + side, left : left + side]
    if params.prefilter_size is not None:
        gray = _resize(gray, params.prefilter_size, cv2.INTER_AREA)
    if params.equalize != "none":
        gray = _equalize(gray, params.equalize)
    return stretch(_resize(gray, params.size, INTERPOLATIONS[params.interpolation]))


def stretch(array: np.ndarray) -> np.ndarray:
    """Linearly map an array's range onto [0, 1] (float32); a flat array becomes zeros."""
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def _resize(gray: np.ndarray, side: int, shrink_interpolation: int) -> np.ndarray:
    height, width = gray.shape
    if (height, width) == (side, side):
        return gray
    enlarging = side > min(height, width)
    interpolation = cv2.INTER_CUBIC if enlarging and shrink_interpolation == cv2.INTER_AREA else shrink_interpolation
    return cv2.resize(gray, (side, side), interpolation=interpolation)


def _equalize(gray: np.ndarray, method: str) -> np.ndarray:
    pixels = np.round(stretch(gray) * 255).astype(np.uint8)
    if method == "hist":
        pixels = cv2.equalizeHist(pixels)
    else:
        pixels = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(pixels)
    return pixels.astype(np.float32) / 255


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.array(image, dtype=np.uint16)
    if image.mode in ("I", "F"):  # 32-bit integer or float: no fixed range to divide by
        return stretch(np.array(image, dtype=np.float64))
    if image.mode not in ("L",):
        image = image.convert("L")
    return np.array(image, dtype=np.uint8)


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
    _check_size(array.shape[1], array.shape[0], limits)
    return array


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(_too_many_pixels_message(width * height, limits))
    if min(width, height) < limits.min_side:
        raise InvalidImageError(
            f"The image is {width}x{height} pixels: too small to be a chest X-ray "
            f"(at least {limits.min_side} pixels a side)."
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise InvalidImageError(
            f"The image is {width}x{height} pixels: too elongated to be a chest X-ray "
            f"(at most {limits.max_aspect:g}:1)."
        )


def _too_many_pixels_message(pixels: int | None, limits: DecodeLimits) -> str:
    size = f" ({pixels / 1e6:.0f} megapixels)" if pixels else ""
    return f"The image is too large{size}; the limit is {limits.max_pixels / 1e6:.0f} megapixels."
