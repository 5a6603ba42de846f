"""DICOM radiographs: pixels with display transforms applied, and the film's facts.

Besides the technical attributes needed to decode (modality, frame count,
photometric interpretation, LUTs), only what the population check needs is read:
the patient's age (PatientAge, or PatientBirthDate with the study's date), the view
and the body part (``FilmFacts``). No name, identifier or other patient attribute is
read, and none is returned or logged. Compressed transfer syntaxes decode where pydicom's own decoders or Pillow
cover them (RLE Lossless, Deflated, JPEG Baseline).
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .errors import InvalidImageError
from .film_facts import FilmFacts, age_from_dates, parse_dicom_age
from .pixels import stretch

RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}


def decode_dicom(data: bytes, check_size: Callable[[int, int], None]) -> tuple[np.ndarray, FilmFacts]:
    """DICOM bytes -> (2-D float32 in [0, 1], bright bone as in any radiograph; the film's facts)."""
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
    return pixels, film_facts(dataset)


def _text(dataset, keyword: str) -> str | None:
    """A tag's value as stripped text; None when missing, empty or unreadable (never raises)."""
    try:
        value = dataset.get(keyword)
        text = str(value).strip() if value is not None else ""
    except Exception:  # a malformed element may raise on access
        return None
    return text or None


def film_facts(dataset) -> FilmFacts:
    age = parse_dicom_age(_text(dataset, "PatientAge"))
    if age is None:
        age = age_from_dates(_text(dataset, "PatientBirthDate"), _text(dataset, "StudyDate"),
                             _text(dataset, "AcquisitionDate"), _text(dataset, "ContentDate"))
    view = _text(dataset, "ViewPosition")
    body_part = _text(dataset, "BodyPartExamined")
    return FilmFacts(age, view.upper() if view else None, body_part.upper() if body_part else None)
