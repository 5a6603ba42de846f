"""Array arithmetic shared by the decoders and the preprocessing: gray, float, [0, 1]."""
from __future__ import annotations

import cv2
import numpy as np

from .errors import InvalidImageError


def stretch(array: np.ndarray) -> np.ndarray:
    """Linearly map an array's range onto [0, 1] (float32); a flat array becomes zeros."""
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6:
        return np.zeros_like(array)
    return (array - low) / (high - low)


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
