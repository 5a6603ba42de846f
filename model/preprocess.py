"""The one preprocessing path shared by training, evaluation and the web app.

bytes --decode_image (decode.py)--> 2-D array (uint8/uint16/float, any size)
      --preprocess----------------> float32 (size, size) in [0, 1], what the network sees

The geometry is a recorded parameter because the dataset's training copies were
squashed to 224x224 (aspect ratio lost) while real uploads keep their own aspect
ratio: the crop must be chosen so that an upload looks like what the model was
trained on. ``PreprocessParams`` is stored in every checkpoint and compared on load.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from .decode import DecodeLimits, decode_image
from .errors import InvalidImageError
from .framing import film_bounds
from .pixels import stretch, to_gray_float

#: Bump when the arithmetic below changes in a way that changes model inputs.
#: 2: JPEGs decode at a reduced DCT scale (``decode.py``) and 8/16-bit images shrink
#: to the prefilter size before the float conversion; a 224 px image (the training
#: copies) gives exactly the input of version 1.
#: 3: ``frame``: the film is cut out of a uniform border or letterbox first (``framing.py``).
#: A version-2 record reads as version 3 with ``frame="keep"``, which computes the same.
PREPROCESS_VERSION = 3

GEOMETRIES = ("squash", "center_crop")
FRAMES = ("trim", "keep")
EQUALIZATIONS = ("none", "hist", "clahe")
INTERPOLATIONS = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that decides the model input; recorded in the checkpoint.

    geometry: ``squash`` resizes the whole image to a square (as the training copies
    were made); ``center_crop`` cuts the largest centred square first (the seed's way).
    prefilter_size: before the final cubic resize, shrink with area averaging to this
    square size, so a 2500 px upload is low-passed the way the 224 px training copies
    were instead of being aliased by a single cubic step. ``None`` disables it.
    frame: ``trim`` cuts the film out of a uniform border or letterbox that an export
    added (``framing.film_bounds``) before anything else; ``keep`` leaves it.
    """

    size: int = 64
    geometry: str = "squash"
    interpolation: str = "cubic"
    prefilter_size: int | None = 224
    equalize: str = "none"
    frame: str = "trim"
    version: int = PREPROCESS_VERSION

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {self.geometry!r}; expected one of {GEOMETRIES}")
        if self.equalize not in EQUALIZATIONS:
            raise ValueError(f"unknown equalization {self.equalize!r}; expected one of {EQUALIZATIONS}")
        if self.frame not in FRAMES:
            raise ValueError(f"unknown frame handling {self.frame!r}; expected one of {FRAMES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if not isinstance(self.size, int) or not 8 <= self.size <= 1024:
            raise ValueError(f"size must be an integer in [8, 1024], got {self.size!r}")
        if self.prefilter_size is not None and self.prefilter_size < self.size:
            raise ValueError("prefilter_size must be at least size")

    @property
    def decode_side(self) -> int:
        """The smallest square the image is shrunk to first: a decoder may skip detail below it."""
        return self.prefilter_size or self.size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessParams:
        known = {f.name for f in fields(cls)}
        if data.get("version") == 2 and "frame" not in data:
            data = {**data, "frame": "keep", "version": 3}  # what version 2 computed
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {sorted(unknown)}")
        params = cls(**data)
        if params.version != PREPROCESS_VERSION:
            raise ValueError(
                f"preprocessing version {params.version} is not this code's version {PREPROCESS_VERSION}"
            )
        return params


def preprocess(
    image: bytes | np.ndarray,
    params: PreprocessParams = PreprocessParams(),
    limits: DecodeLimits = DecodeLimits(),
) -> np.ndarray:
    """Encoded bytes or a decoded array -> the float32 (size, size) model input in [0, 1]."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = decode_image(bytes(image), limits, min_side=params.decode_side)
    gray = np.asarray(image)
    if gray.ndim == 3 and gray.shape[2] in (3, 4) and gray.dtype in (np.uint8, np.uint16):
        gray = cv2.cvtColor(np.ascontiguousarray(gray[:, :, :3]), cv2.COLOR_RGB2GRAY)  # exact for gray pictures
    if not (gray.ndim == 2 and gray.dtype in (np.uint8, np.uint16)):
        gray = to_gray_float(gray)  # float, bool or odd layouts: to float gray first
    height, width = gray.shape
    if min(height, width) < 2:
        raise InvalidImageError("The image is too small.")
    if params.frame == "trim":
        top, bottom, left, right = film_bounds(gray)
        gray = gray[top:bottom, left:right]
        height, width = gray.shape
    if params.geometry == "center_crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        gray = gray[top : top + side, left : left + side]
    if params.prefilter_size is not None:
        # Shrinking 8- or 16-bit pixels before the float conversion touches a few
        # thousand values instead of millions; a 224 px image is not resized at all.
        gray = _resize(gray, params.prefilter_size, cv2.INTER_AREA)
    gray = to_gray_float(gray)
    if params.equalize != "none":
        gray = _equalize(gray, params.equalize)
    return stretch(_resize(gray, params.size, INTERPOLATIONS[params.interpolation]))


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

