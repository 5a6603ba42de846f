"""Small JPEGs of public dataset films for the analysis page; nothing outside the dataset folder."""
from __future__ import annotations

from pathlib import Path

import cv2

from model.settings import IMAGE_SUFFIXES

THUMBNAIL_SIDE = 160


def dataset_file(root: Path, relpath: str) -> Path | None:
    """The image file ``relpath`` names inside ``root``, or None for anything else."""
    root = root.resolve()
    path = (root / relpath).resolve()
    if not root.is_dir() or not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return path if path.is_file() else None


def thumbnail_jpeg(path: Path, side: int = THUMBNAIL_SIDE) -> bytes | None:
    """The film shrunk to ``side`` px on its longer side, as JPEG bytes; None if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        return None
    scale = side / max(image.shape)
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return buffer.tobytes() if ok else None
