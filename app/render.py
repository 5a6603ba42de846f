"""Pictures for the result page, rendered in memory as data URIs (never stored)."""
from __future__ import annotations

import base64

import cv2
import numpy as np


def png_data_uri(gray: np.ndarray) -> str:
    """A float image in [0, 1] as an inline PNG."""
    pixels = np.clip(np.asarray(gray) * 255 + 0.5, 0, 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".png", pixels)
    if not ok:  # pragma: no cover - encoding a uint8 array does not fail
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buffer.tobytes()).decode("ascii")


def roc_polyline(roc: dict | None, size: int = 240) -> str:
    """SVG polyline points of an ROC curve in a size x size box (y grows downwards)."""
    if not roc:
        return ""
    return " ".join(f"{fpr * size:.1f},{(1 - tpr) * size:.1f}" for fpr, tpr in zip(roc["fpr"], roc["tpr"]))
