"""What an X-ray system or an export may do to a film, one function a change.

Each takes an 8-bit gray film (H, W) at its own resolution and returns one. Training's
random site processing (``processing``) draws their parameters, the site-shift suite's
rows (``site_shift.CHANGES``) and the simulated sites (``site_shift.SIMULATED_SITES``) fix
them: all three change films through these functions. ``augment`` works on 64 x 64 model
inputs as tensors, and ``robustness`` warps model inputs; neither changes a whole film.
"""
from __future__ import annotations

import cv2
import numpy as np

#: One line of burned-in text: (string, (x, y) as shares of the width and height, size as a
#: share of the film's shorter side / 400 px, gray value, bold).
Line = tuple[str, tuple[float, float], float, int, bool]


def clahe(film: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation, as many systems' local contrast processing."""
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(film)


def equalise(film: np.ndarray, blend: float = 1.0) -> np.ndarray:
    """Histogram equalisation, mixed with the film by ``blend`` (1: full)."""
    if blend >= 1:
        return cv2.equalizeHist(film)
    equalised = cv2.equalizeHist(film).astype(np.float32)
    return np.clip(blend * equalised + (1 - blend) * film, 0, 255).astype(np.uint8)


def smooth(x: np.ndarray, sigma: float, exact: bool = False) -> np.ndarray:
    """A Gaussian blur of ``sigma`` pixels; a wide one is taken on a smaller copy (the same low-pass)
    unless ``exact`` (cheap on training's 224 px copies, slow on a full-size film)."""
    if exact or sigma <= 8:
        return cv2.GaussianBlur(x, (0, 0), sigma)
    factor = sigma / 4
    small = cv2.resize(x, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), 4), x.shape[::-1], interpolation=cv2.INTER_LINEAR)


def unsharp(film: np.ndarray, sigma: float, amount: float, exact: bool = False) -> np.ndarray:
    """Unsharp masking: the film plus ``amount`` times its detail above a blur of ``sigma`` pixels."""
    x = film.astype(np.float32)
    return np.clip(x + amount * (x - smooth(x, sigma, exact)), 0, 255).astype(np.uint8)


def multiscale(film: np.ndarray) -> np.ndarray:
    """Multi-scale enhancement: detail at three scales boosted, as vendors' processing does."""
    x = film.astype(np.float32)
    out = x.copy()
    for fraction, gain in ((0.005, 0.6), (0.02, 0.5), (0.08, 0.4)):
        out += gain * (x - smooth(x, fraction * min(film.shape)))
    return np.clip(out, 0, 255).astype(np.uint8)


def curve(film: np.ndarray, gamma: float = 1.0, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """A look-up curve: gamma, then the gray levels mapped into [low, high] of the range (exposure, window)."""
    table = np.clip(255 * (low + (high - low) * (np.arange(256) / 255) ** gamma), 0, 255).astype(np.uint8)
    return cv2.LUT(film, table)


def jpeg(film: np.ndarray, quality: int) -> np.ndarray:
    """Re-compressed as JPEG at ``quality``."""
    ok, data = cv2.imencode(".jpg", film, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def noise(film: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian grain of ``sigma`` gray levels."""
    return np.clip(film + rng.normal(0, sigma, film.shape), 0, 255).astype(np.uint8)


def text(film: np.ndarray, lines: list[Line]) -> np.ndarray:
    """Text burned into the film (side markers, dates, exposure), as many systems do."""
    out = film.copy()
    height, width = film.shape
    scale = min(film.shape) / 400
    thickness = max(1, round(2 * scale))
    for string, (x, y), size, value, bold in lines:
        cv2.putText(out, string, (round(x * width), round(y * height)), cv2.FONT_HERSHEY_SIMPLEX, size * scale,
                    int(value), thickness + bold)
    return out


def burned_in(film: np.ndarray) -> np.ndarray:
    """A side marker and two lines of text in white, as a portable unit burns them in."""
    return text(film, [("R", (0.06, 0.12), 2.0, 255, True),
                       ("AP SUPINE  PORTABLE", (0.45, 0.90), 0.6, 255, False),
                       ("2026-12-06 04:18  kV 60 mAs 2.0", (0.45, 0.95), 0.6, 255, False)])


def border(film: np.ndarray, fraction: float, value: int) -> np.ndarray:
    """A uniform frame of ``fraction`` of the shorter side on every edge."""
    width = max(1, round(fraction * min(film.shape)))
    return cv2.copyMakeBorder(film, width, width, width, width, cv2.BORDER_CONSTANT, value=value)


def letterbox(film: np.ndarray, value: int) -> np.ndarray:
    """Padded to a square (the short side filled), as a viewer exporting a square image does."""
    height, width = film.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return cv2.copyMakeBorder(film, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT,
                              value=value)


def collimate(film: np.ndarray, fraction: float) -> np.ndarray:
    """Tighter framing: ``fraction`` of each side cut away."""
    height, width = film.shape
    dy, dx = round(fraction * height), round(fraction * width)
    return film[dy : height - dy, dx : width - dx]


def resample(film: np.ndarray, side: int, enlarge: bool = True) -> np.ndarray:
    """The longer side brought to ``side`` pixels (area averaging down, cubic up); with ``enlarge``
    False a smaller film is left as it is (an export capped in size)."""
    scale = side / max(film.shape)
    if scale >= 1 and not enlarge:
        return film
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(film, None, fx=scale, fy=scale, interpolation=interpolation)


def rotate(film: np.ndarray, degrees: float) -> np.ndarray:
    """Turned about its centre (anticlockwise positive), the corners filled black."""
    height, width = film.shape
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    return cv2.warpAffine(film, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def invert(film: np.ndarray) -> np.ndarray:
    """A MONOCHROME1 film exported without inversion: bone dark, air bright."""
    return 255 - film
