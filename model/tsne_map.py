"""The t-SNE map of the dataset: one file, one owner, one model version.

Written by ``training/tsne.py``, read by the app's analysis page. It holds
coordinates and metadata only, never images, and names the checkpoint version whose
features it maps, so the page can say when the serving model has moved on.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np

from .atomic import atomic_write

FORMAT_VERSION = 2  # 2 adds the learned features, for the nearest training films
READABLE_VERSIONS = (1, 2)


class TsneMapError(RuntimeError):
    """The map file is missing, unreadable or of another format version."""


@dataclass
class TsneMap:
    checkpoint_version: str
    created_at: str
    threshold: float
    pixel_xy: np.ndarray  # (N, 2) t-SNE of the 64x64 model inputs
    feature_xy: np.ndarray  # (N, 2) t-SNE of the learned features
    split: np.ndarray  # (N,) "train" or "test"
    label: np.ndarray  # (N,) int8, 1 = PNEUMONIA
    files: np.ndarray  # (N,) paths relative to the dataset folder
    probability: np.ndarray  # (N,) float32, calibrated
    correct: np.ndarray  # (N,) bool, the decision at ``threshold`` was right
    #: (N, D) float32 learned features, standardised with the training split's mean and
    #: std (``feature_mean``, ``feature_std``); absent in format 1 files
    features: np.ndarray | None = None
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None

    _PER_POINT = ("pixel_xy", "feature_xy", "split", "label", "files", "probability", "correct")
    _OPTIONAL = ("features", "feature_mean", "feature_std")

    def __len__(self) -> int:
        return len(self.label)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically: the page never reads half a file."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, format_version=np.int64(FORMAT_VERSION),
                            **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)
                               if getattr(self, f.name) is not None})
        with atomic_write(path) as handle:
            handle.write(buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TsneMap:
        path = Path(path)
        if not path.is_file():
            raise TsneMapError(f"No t-SNE artifact at {path}.")
        try:
            with np.load(path, allow_pickle=False) as data:
                key = "format_version" if "format_version" in data.files else "artifact_version"
                version = int(data[key])
                if version not in READABLE_VERSIONS:
                    raise TsneMapError(f"The t-SNE artifact at {path} has format version {version}; "
                                       f"this code reads {FORMAT_VERSION}.")
                values = {f.name: data[f.name] for f in fields(cls) if f.name not in cls._OPTIONAL}
                values.update({name: data[name] for name in cls._OPTIONAL if name in data.files})
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise TsneMapError(f"The t-SNE artifact at {path} is unreadable ({type(exc).__name__}).") from None
        values["checkpoint_version"] = str(values["checkpoint_version"])
        values["created_at"] = str(values["created_at"])
        values["threshold"] = float(values["threshold"])
        tsne_map = cls(**values)
        per_point = cls._PER_POINT + (("features",) if tsne_map.features is not None else ())
        if any(len(getattr(tsne_map, key)) != len(tsne_map) for key in per_point):
            raise TsneMapError(f"The t-SNE artifact at {path} is unreadable (columns of different lengths).")
        return tsne_map


@lru_cache(maxsize=4)
def load_shared(path: str, mtime_ns: int | None) -> TsneMap:
    """``TsneMap.load``, read once per version of the file (``mtime_ns``) and shared by the
    app's views of it (the analysis plot, the result page's map, the neighbour index, the
    monitor's reference), which only read it."""
    return TsneMap.load(path)
