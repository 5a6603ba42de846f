"""DICOM files built with pydicom from generated pixel arrays (no real patient data)."""
from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-0042-SECRET"

def make_dicom(pixels: np.ndarray, modality="DX", photometric="MONOCHROME2", bits_stored=12, window=None,
               frames: int = 1, pixel_data: bool = True, compress: bool = False, tags: dict | None = None) -> bytes:
    """``tags``: more attributes by keyword (``PatientAge="003Y"``, ``ViewPosition="LL"``...)."""
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
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

def twelve_bit(image_uint8: np.ndarray) -> np.ndarray:
    return (image_uint8.astype(np.uint16) * 16).astype(np.uint16)

assert pydicom  # imported for its side effects on uid handling in older versions
