"""DICOM radiographs: pixels with display transforms applied, and the film's facts.

Besides the technical attributes needed to decode (modality, frame count,
photometric interpretation, LUTs), only what the population check needs is read:
the patient's age (PatientAge, or PatientBirthDate with the study's date), the view
and the body part (``FilmFacts``). No name, identifier or other patient attribute is
read, and none is returned or logged. Compressed transfer syntaxes decode where pydicom's
own decoders, Pillow or the pylibjpeg plugins cover them (RLE Lossless, Deflated, JPEG
Baseline, JPEG Lossless, JPEG 2000; JPEG-LS through pyjpegls).

Every allocation is bounded before it is made: a deflated dataset is inflated here,
never past what the largest permitted film needs (pydicom would inflate all of it
first), and the pixel count, frame count, samples and bit depth are checked from the
header before the pixels are read. Any other failure of the reader on a malformed
file is that file's ``InvalidImageError``.
"""
from __future__ import annotations

import io
import logging
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pydicom
from pydicom.dataset import FileDataset
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from .errors import ImageError, ImageTooLargeError, InvalidImageError, UnreadableFileError
from .film_facts import FilmFacts, age_from_dates, parse_dicom_age
from .pixels import stretch

RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}

# pydicom's complaints about invalid values quote the values, and a value may be a
# patient's name: it checks nothing on reading, and its warnings and log stay quiet.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.CRITICAL)


#: Explicit VRs whose length field is 4 bytes (after 2 reserved ones); the others have 2.
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
#: Headers, overlays and the like beside the pixels of a film, when bounding a deflated dataset.
HEADER_ALLOWANCE = 1 << 20
CORRUPT = "The DICOM file is corrupt or truncated."


def is_dicom(data: bytes) -> bool:
    """The DICM prefix after the 128-byte preamble, or (a file written without the preamble)
    a file meta group at the very start: group 0002 with an explicit VR."""
    return data[128:132] == b"DICM" or (data[:2] == b"\x02\x00" and data[4:6].isalpha() and data[4:6].isupper())


def file_meta_end(data: bytes) -> tuple[int, str | None]:
    """(offset where the dataset starts, the transfer syntax UID) from the file meta group,
    which is always explicit VR little endian; read without pydicom, so that nothing after
    it is inflated or parsed yet."""
    position = 132 if data[128:132] == b"DICM" else 0
    syntax = None
    while position + 8 <= len(data) and data[position : position + 2] == b"\x02\x00":
        element = int.from_bytes(data[position + 2 : position + 4], "little")
        if data[position + 4 : position + 6] in LONG_VRS:
            length, start = int.from_bytes(data[position + 8 : position + 12], "little"), position + 12
        else:
            length, start = int.from_bytes(data[position + 6 : position + 8], "little"), position + 8
        if element == 0x0010:
            syntax = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        position = start + length
    return position, syntax


def inflate(data: bytes, max_bytes: int) -> bytes:
    """A raw deflate stream, inflated to at most ``max_bytes``; ``ImageTooLargeError`` past that."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data, max_bytes + 1)
    except zlib.error:
        raise InvalidImageError("The DICOM file's deflated data is corrupt.") from None
    if len(inflated) > max_bytes or inflater.unconsumed_tail:
        raise ImageTooLargeError(f"The deflated DICOM file inflates to more than {max_bytes / 2**20:.0f} MB, "
                                 "more than the largest film we accept needs.")
    return inflated


def read_dataset_bounded(data: bytes, max_pixels: int) -> pydicom.Dataset:
    """The parsed file; a deflated dataset inflated within the bound of a 16-bit film of ``max_pixels``."""
    dataset_start, syntax = file_meta_end(data)
    if syntax != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    meta = pydicom.dcmread(io.BytesIO(data[:dataset_start]), force=True).file_meta
    inflated = inflate(data[dataset_start:], 2 * max_pixels + HEADER_ALLOWANCE)
    body = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated bytes are
    return FileDataset(None, body, preamble=None, file_meta=meta, is_implicit_VR=False, is_little_endian=True)


def decode_dicom(data: bytes, check_size: Callable[[int, int], None],
                 max_pixels: int) -> tuple[np.ndarray, FilmFacts]:
    """DICOM bytes -> (2-D float32 in [0, 1], bright bone as in any radiograph; the film's facts).

    ``check_size(width, height)`` raises for a film we refuse; ``max_pixels`` bounds inflation.
    """
    try:
        return _decode(data, check_size, max_pixels)
    except ImageError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed elements
        raise UnreadableFileError(CORRUPT, cause=type(exc).__name__) from None


def _decode(data: bytes, check_size: Callable[[int, int], None], max_pixels: int) -> tuple[np.ndarray, FilmFacts]:
    dataset = read_dataset_bounded(data, max_pixels)
    if "PixelData" not in dataset:
        raise InvalidImageError("The DICOM file holds no image (no pixel data): upload the radiograph itself.")
    modality = str(dataset.get("Modality", "") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise InvalidImageError(
            f"The DICOM file is a {modality[:16]} study; this model reads plain chest radiographs (CR or DX) only."
        )
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        bits = int(dataset.get("BitsAllocated", 16) or 16)
    except (AttributeError, TypeError, ValueError):
        raise InvalidImageError("The DICOM file's image attributes are missing or invalid.") from None
    if frames > 1:
        raise InvalidImageError(f"The DICOM file holds {frames} frames (a series); upload a single radiograph.")
    check_size(columns, rows)
    if samples * rows * columns > max_pixels:
        raise ImageTooLargeError(f"The DICOM image holds {samples} samples a pixel: too many values to read.")
    if samples not in (1, 3) or bits not in (1, 8, 16):
        raise InvalidImageError(f"The DICOM image has {samples} samples of {bits} bits a pixel; "
                                "a radiograph has one sample of 8 to 16 bits.")
    try:
        pixels = dataset.pixel_array
        pixels = apply_modality_lut(pixels, dataset)
        pixels = apply_voi_lut(pixels, dataset)
    except Exception:  # pydicom raises many types for unsupported or broken pixel data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax in AllTransferSyntaxes else "an unknown transfer syntax"
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
