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

import numpy as np

from . import film_changes as changes

#: Bump when a family or its ranges change: the cached processed copies depend on them.
#: 2: the families draw through ``film_changes`` (text placed to the nearest pixel, not truncated).
PROCESSING_VERSION = 2


def _clahe(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    clip = float(rng.uniform(0.8, 4.0))
    return changes.clahe(film, clip, int(rng.choice([4, 6, 8, 10])))


def _equalise(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return changes.equalise(film, float(rng.uniform(0.5, 1.0)))  # full or partial equalisation


def _unsharp(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = float(rng.uniform(0.01, 0.1)) * min(film.shape)
    return changes.unsharp(film, sigma, float(rng.uniform(0.4, 1.5)), exact=True)


def _curve(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A look-up curve: gamma, then the range mapped into a window."""
    gamma = float(np.exp(rng.uniform(-0.5, 0.5)))
    low = float(rng.uniform(0.0, 0.2))
    return changes.curve(film, gamma, low, float(rng.uniform(0.7, 1.0)))


def _recompressed(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return changes.jpeg(film, int(rng.integers(15, 60)))


def _noisy(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return changes.noise(film, float(rng.uniform(2, 8)), rng)


def _text(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A side marker and a line of text, white, somewhere near the edges."""
    lines = []
    for _ in range(int(rng.integers(1, 3))):
        string = "".join(rng.choice(list("ABCDEFGHKLMNPRSTUVX0123456789 :-"), int(rng.integers(1, 12))))
        row = rng.uniform(0.05, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 0.97)
        x = rng.uniform(0.02, 0.6)
        lines.append((string, (float(x), float(row)), float(rng.uniform(0.5, 2.0)), int(rng.choice([255, 230, 0])),
                      False))
    return changes.text(film, lines)


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
