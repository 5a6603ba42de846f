"""DICOM files built with pydicom from generated pixel arrays (no real patient data)."""
from __future__ import annotations

import datetime as dt
import io
import zlib
from collections.abc import Iterator

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-0042-SECRET"

def make_dicom(pixels: np.ndarray, modality="DX", photometric="MONOCHROME2", bits_stored=12, window=None,
               frames: int = 1, pixel_data: bool = True, compress: bool = False, tags: dict | None = None,
               deflate: bool = False, preamble: bool = True) -> bytes:
    """``tags``: more attributes by keyword (``PatientAge="003Y"``, ``ViewPosition="LL"``...);
    ``deflate``: the Deflated Explicit VR Little Endian transfer syntax; ``preamble``: False
    writes the file without its 128-byte preamble and DICM prefix, as some systems do."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = modality
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    if pixel_data:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
            pixels = np.stack([pixels] * frames)
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        if compress:
            ds.compress(RLELossless)
    if deflate:
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue() if preamble else buffer.getvalue()[132:]


def deflate_bomb(compressed_mb: float = 3.0) -> bytes:
    """A DICOM file in the deflated transfer syntax whose dataset inflates about a
    thousandfold: ``compressed_mb`` of zeros' deflate stream after a valid file meta."""
    head = make_dicom(np.zeros((64, 64), np.uint16), deflate=True)
    meta = head[:132 + 12 + int.from_bytes(head[140:144], "little")]  # preamble, DICM, the meta group
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 24)
    first, repeated, again = (compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH) for _ in range(3))
    assert repeated == again  # after a full flush over a window of zeros, each chunk compresses alike
    copies = int(compressed_mb * 2**20 / len(repeated))
    return meta + first + repeated * copies + compressor.flush()

def twelve_bit(image_uint8: np.ndarray) -> np.ndarray:
    return (image_uint8.astype(np.uint16) * 16).astype(np.uint16)

assert pydicom  # imported for its side effects on uid handling in older versions


def fuzz_bases() -> list[bytes]:
    """Small valid files of each kind the mutations start from."""
    from harness.images import synthetic_xray

    film = twelve_bit(synthetic_xray(96, 80))
    tags = {"PatientAge": "004Y", "ViewPosition": "PA", "BodyPartExamined": "CHEST", "WindowCenter": 2000,
            "WindowWidth": 3000}
    return [make_dicom(film), make_dicom(film, compress=True), make_dicom(film, deflate=True),
            make_dicom(film, preamble=False), make_dicom(film, tags=tags), make_dicom(film, photometric="MONOCHROME1")]


def mutations(count: int, seed: int = 0) -> Iterator[bytes]:
    """``count`` files made from ``fuzz_bases`` by seeded mutations: flipped bytes, cut files,
    length fields and VRs overwritten, bytes inserted or repeated."""
    rng = np.random.default_rng(seed)
    bases = fuzz_bases()
    for _ in range(count):
        data = bytearray(bases[rng.integers(len(bases))])
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(6)
            at = int(rng.integers(len(data)))
            if kind == 0:  # flip a few bytes
                for offset in rng.integers(len(data), size=rng.integers(1, 9)):
                    data[offset] ^= int(rng.integers(1, 256))
            elif kind == 1:  # cut the file short
                del data[max(at, 8):]
            elif kind == 2:  # a length field: odd, huge, or off by a little
                value = int(rng.choice([0xFFFFFFFF, 0xFFFF, 1, 3, 0x7FFFFFFF, at]))
                data[at : at + 4] = value.to_bytes(4, "little")
            elif kind == 3:  # a VR where one is expected: unknown or the wrong one
                vr = data.find(bytes(rng.choice([b"US", b"UI", b"CS", b"OW", b"OB", b"IS", b"DS", b"AS"])), at)
                if vr >= 0:
                    data[vr : vr + 2] = bytes(rng.choice([b"ZZ", b"SQ", b"UN", b"OB", b"FD", b"\0\0"]))
            elif kind == 4:  # bytes inserted
                data[at:at] = rng.bytes(int(rng.integers(1, 64)))
            else:  # a slice repeated
                data[at:at] = data[at : at + int(rng.integers(2, 200))]
        yield bytes(data)


def dx_film(pixels: np.ndarray, tags: dict | None = None, sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1",
            transfer_syntax: str = ExplicitVRLittleEndian, study_uid: str | None = None) -> pydicom.Dataset:
    """A DX (For Presentation) film as a PACS holds it: patient, study and series modules, 8 bits
    stored; ``transfer_syntax`` JPEG 2000 Lossless or RLE compresses it (pylibjpeg-openjpeg encodes)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "20230101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime = dt.datetime.now().strftime("%Y%m%d"), dt.datetime.now().strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber = "1", "ACC-0042"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, 1
    ds.Modality = "CT" if sop_class == "1.2.840.10008.5.1.4.1.1.2" else "DX"
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    pixels = np.asarray(pixels, np.uint8)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))  # read back: encoded as a received file is
