"""Pictures for the result page, rendered in memory as data URIs (never stored)."""
from __future__ import annotations

import base64

import cv2
import numpy as np


def png_data_uri(gray: np.ndarray) -> str:
    """A float image in [0, 1] as an inline PNG."""
    pixels = np.clip(np.asarray(gray) * 255 + 0.5, 0, 255).astype(np.uint8)
    return png_bytes_data_uri(encode_png(pixels))


def roc_polyline(roc: dict | None, size: int = 240) -> str:
    """SVG polyline points of an ROC curve in a size x size box (y grows downwards)."""
    if not roc:
        return ""
    return " ".join(f"{fpr * size:.1f},{(1 - tpr) * size:.1f}" for fpr, tpr in zip(roc["fpr"], roc["tpr"]))


#: OpenCV's JET colour map as a lookup table (256 x 1, BGR), made once: ``cv2.applyColorMap``
#: builds its table anew on every call, which costs more than drawing the 64 px map.
JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)


def saliency_empty(heat: np.ndarray) -> bool:
    """True when no cell pushed the pneumonia score up: Grad-CAM keeps only the positive
    push, so the map is zero everywhere (about four in ten of the bundled model's NORMAL
    answers on the test split) and a drawing of it would be a plain grey square."""
    return not float(np.max(heat)) > 0


def saliency_png(gray: np.ndarray, heat: np.ndarray, side: int = 256) -> bytes:
    """The heat map (0..1) in a red-yellow colour map over the gray image, as PNG bytes.

    The page asks for 64 px, the film's own size, and lets the browser scale it as it
    does the input and aligned films beside it: the map is 8 px, so nothing is lost,
    and a small colour PNG costs a fraction of a large one.
    """
    base = cv2.resize(np.clip(gray, 0, 1).astype(np.float32), (side, side), interpolation=cv2.INTER_NEAREST)
    # cubic interpolation overshoots: clipped again after it
    heat = cv2.resize(np.clip(heat, 0, 1).astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    heat = np.clip(heat, 0, 1)
    index = np.uint8(heat * 255)
    colour = cv2.LUT(cv2.merge([index, index, index]), JET).astype(np.float32) / 255
    gray3 = np.repeat(base[:, :, None], 3, axis=2)
    alpha = 0.55 * heat[:, :, None]  # cold regions keep the film visible
    blended = (1 - alpha) * gray3 + alpha * colour
    return encode_png(np.uint8(np.clip(blended, 0, 1) * 255))


def encode_png(pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", pixels)
    if not ok:  # only for an array no PNG can hold; a bug, reported as one
        raise RuntimeError(f"cannot encode a {pixels.dtype} array of shape {pixels.shape} as PNG")
    return buffer.tobytes()


def png_bytes_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def reliability_bars(bins: list[dict], size: int = 240) -> list[dict]:
    """SVG rectangles for a reliability diagram: observed rate per predicted-probability bin."""
    bars = []
    for b in bins:
        height = b["observed"] * size
        bars.append({"x": b["low"] * size + 1, "width": (b["high"] - b["low"]) * size - 2,
                     "y": size - height, "height": height, "count": b["count"],
                     "mean_y": size - b["mean_probability"] * size})
    return bars
