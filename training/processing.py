"""Random image processing of the kinds X-ray systems apply, for training.

Another hospital's films reach the model after its own system's processing: local
contrast enhancement (CLAHE and its cousins), histogram equalisation, unsharp masking,
a look-up curve, re-compression, noise, burned-in text. None changes a diagnosis. Each
training film is also kept, preprocessed, in a few copies under a random draw of such
processing (``process``), and the training views, the population head and the feature
gate see those copies beside the film as it is.

Every family draws its own parameters, so training meets a spread of settings rather
than the fixed rows that ``training.site_shift`` measures; multi-scale enhancement and
16 x 16-tile CLAHE are left out here, so that the suite shows how the model does on
processing it never saw.
"""
from __future__ import annotations

import hashlib

import cv2
import numpy as np

#: Bump when a family or its ranges change: the cached processed copies depend on them.
PROCESSING_VERSION = 1


def _clahe(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    clip = float(rng.uniform(0.8, 4.0))
    tiles = int(rng.choice([4, 6, 8, 10]))
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(film)


def _equalise(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    equalised = cv2.equalizeHist(film).astype(np.float32)
    blend = float(rng.uniform(0.5, 1.0))  # full or partial equalisation
    return np.clip(blend * equalised + (1 - blend) * film, 0, 255).astype(np.uint8)


def _unsharp(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = float(rng.uniform(0.01, 0.1)) * min(film.shape)
    amount = float(rng.uniform(0.4, 1.5))
    x = film.astype(np.float32)
    return np.clip(x + amount * (x - cv2.GaussianBlur(x, (0, 0), sigma)), 0, 255).astype(np.uint8)


def _curve(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A look-up curve: gamma, then the range mapped into a window."""
    gamma = float(np.exp(rng.uniform(-0.5, 0.5)))
    low = float(rng.uniform(0.0, 0.2))
    high = float(rng.uniform(0.7, 1.0))
    table = np.clip(255 * (low + (high - low) * (np.arange(256) / 255) ** gamma), 0, 255).astype(np.uint8)
    return cv2.LUT(film, table)


def _recompressed(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", film, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(15, 60))])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def _noisy(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(film + rng.normal(0, float(rng.uniform(2, 8)), film.shape), 0, 255).astype(np.uint8)


def _text(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A side marker and a line of text, white, somewhere near the edges."""
    out = film.copy()
    height, width = film.shape
    scale = min(film.shape) / 400
    for _ in range(int(rng.integers(1, 3))):
        text = "".join(rng.choice(list("ABCDEFGHKLMNPRSTUVX0123456789 :-"), int(rng.integers(1, 12))))
        row = rng.uniform(0.05, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 0.97)
        origin = (int(rng.uniform(0.02, 0.6) * width), int(row * height))
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.5, 2.0)) * scale,
                    int(rng.choice([255, 230, 0])), max(1, round(2 * scale)))
    return out


#: name -> processing; ``process`` draws one or two of them for a copy.
FAMILIES = {
    "clahe": _clahe,
    "equalise": _equalise,
    "unsharp": _unsharp,
    "curve": _curve,
    "recompressed": _recompressed,
    "noisy": _noisy,
    "text": _text,
}


def rng_for(name: str, seed: int, copy: int) -> np.random.Generator:
    """The same draws for a film every run (the cache depends on it), different for each copy."""
    digest = hashlib.sha256(f"{name}|{seed}|{copy}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def process(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W) -> the film after one or two random processings (contrast processing most often)."""
    names = list(FAMILIES)
    weights = np.array([4, 2, 2, 2, 1, 1, 1], dtype=float)
    count = 1 if rng.random() < 0.6 else 2
    for name in rng.choice(names, count, replace=False, p=weights / weights.sum()):
        film = FAMILIES[name](film, rng)
    return film
