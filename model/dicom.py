"""DICOM radiographs: pixels only, display transforms applied, nothing from the header kept.

Only the technical attributes needed to decode are read (modality, frame count,
photometric interpretation, LUTs); patient attributes are never read, returned or
logged. Compressed transfer syntaxes decode where pydicom's own decoders or Pillow
cover them (RLE Lossless, Deflated, JPEG Baseline).
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .errors import InvalidImageError
from .pixels import stretch

RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}


def decode_dicom(data: bytes, check_size: Callable[[int, int], None]) -> np.ndarray:
    """DICOM bytes -> 2-D float32 in [0, 1], bright bone as in any radiograph."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError, AttributeError):
        raise InvalidImageError("The DICOM file is corrupt or truncated.") from None
    if "PixelData" not in dataset:
        raise InvalidImageError("The DICOM file holds no image (no pixel data): upload the radiograph itself.")
    modality = str(dataset.get("Modality", "") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise InvalidImageError(
            f"The DICOM file is a {modality} study; this model reads plain chest radiographs (CR or DX) only."
        )
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError):
        raise InvalidImageError("The DICOM file's image attributes are missing or invalid.") from None
    if frames > 1:
        raise InvalidImageError(f"The DICOM file holds {frames} frames (a series); upload a single radiograph.")
    check_size(columns, rows)
    try:
        pixels = dataset.pixel_array
        pixels = apply_modality_lut(pixels, dataset)
        pixels = apply_voi_lut(pixels, dataset)
    except Exception:  # pydicom raises many types for unsupported or broken pixel data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "this transfer syntax")
        raise InvalidImageError(f"The DICOM pixel data cannot be decoded ({name}).") from None
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    if pixels.ndim != 2:
        raise InvalidImageError("The DICOM image is not a single 2-D radiograph.")
    pixels = stretch(pixels)
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1 stores bone dark
    return pixels
