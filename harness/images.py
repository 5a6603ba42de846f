"""Synthetic chest-film-like pictures and a tiny dataset folder, made at run time."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def synthetic_xray(height: int = 300, width: int = 240, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """A gray picture with two dark 'lungs' in a bright body: enough structure to test geometry."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = 0.7 - 0.3 * (yy / height)
    for cx in (0.32, 0.68):
        lung = ((xx / width - cx) / 0.15) ** 2 + ((yy / height - 0.5) / 0.3) ** 2 < 1
        image = np.where(lung, 0.25, image)
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    return (image * top).astype(dtype)


def encode(array: np.ndarray, ext: str = ".png") -> bytes:
    ok, buffer = cv2.imencode(ext, array)
    assert ok
    return buffer.tobytes()


def make_dataset(root: Path, per_class: int = 12, size: int = 96) -> Path:
    """train|val|test/NORMAL|PNEUMONIA with a few generated JPEGs; pneumonia films are hazier."""
    for split in ("train", "val", "test"):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = synthetic_xray(size, size + 8 * (split == "test"), seed=i + 100 * label)
                if label:
                    image = cv2.GaussianBlur(image, (0, 0), 3) // 2 + 100
                prefix = f"person{i}_bacteria_{i}" if label else f"IM-{i:04d}-0001"
                cv2.imwrite(str(folder / f"{prefix}.jpeg"), image)
    return root


def make_adult_films(root: Path, patients: int = 6) -> Path:
    """A tiny ``adult_cxr`` folder: 'adult' films (a long narrow chest) and 'lateral' ones, with a manifest."""
    rows = ["file,patient,age,sex,view,finding,license,source_url"]
    for patient in range(patients):
        for view in ("PA", "L"):
            folder = root / ("lateral" if view == "L" else "frontal")
            folder.mkdir(parents=True, exist_ok=True)
            image = synthetic_xray(200, 120 if view == "L" else 220, seed=500 + patient)
            if view == "L":
                image = cv2.GaussianBlur(image, (0, 0), 5)
            name = f"{folder.name}/p{patient}-{view}.jpeg"
            cv2.imwrite(str(root / name), image)
            rows.append(f"{name},{patient},{40 + patient},F,{view},generated,none,none")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def largest_film(megapixels: float = 40.0, seed: int = 0) -> bytes:
    """A PNG at the pixel limit that compresses to a few hundred KB, so that a batch of the
    most files of the most pixels fits in one upload: the costliest request the app takes."""
    height = int((megapixels * 1e6 * 0.8) ** 0.5)
    width = int(megapixels * 1e6 // height)
    small = synthetic_xray(height // 128, width // 128, seed=seed)
    return encode(cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST), ".png")
