"""The training films nearest to an upload, and its place on the dataset map.

Both work in the network's learned-feature space (the "Learned features" t-SNE map):
the training split's features, standardised as the map stored them, are searched by
brute force: exact, and small next to a prediction for 5,216 films (``bench/neighbours.py``
measures it). A new film is placed on the existing map at its nearest training film's
position, which matched t-SNE's own placement of held-out training films better than any
average of neighbours (t-SNE keeps close neighbours close and bends the rest, so averaging
pulls a point towards cluster centres; figures in docs/model.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from .checkpoint import CLASS_NAMES
from .tsne_map import TsneMap

#: How many of the nearest training films the pneumonia count looks at.
COUNT_K = 25


@dataclass(frozen=True)
class Neighbour:
    id: str  # the file stem, e.g. person1261_virus_2147
    path: str  # relative to the dataset folder, for thumbnails
    label: str
    distance: float

    def to_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "distance": round(self.distance, 4)}


class NeighbourIndex:
    """Built from a t-SNE map (format 2) of one model version; read-only, shared by threads."""

    def __init__(self, tsne_map: TsneMap):
        if tsne_map.features is None:
            raise ValueError("this t-SNE map holds no features (format 1): rebuild it with python -m training.tsne")
        train = tsne_map.split == "train"
        self.version = tsne_map.checkpoint_version
        self.features = np.ascontiguousarray(tsne_map.features[train], dtype=np.float32)
        self.squared_norms = np.einsum("nd,nd->n", self.features, self.features)
        self.mean, self.std = tsne_map.feature_mean, tsne_map.feature_std
        self.labels = tsne_map.label[train].astype(int)
        self.paths = [str(p) for p in tsne_map.files[train]]
        self.ids = [PurePosixPath(p).stem for p in self.paths]
        self.positions = tsne_map.feature_xy[train].astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def standardise(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Euclidean distances from one raw feature vector to every training film (one matrix product)."""
        query = self.standardise(features)
        squared = self.squared_norms - 2 * self.features @ query + query @ query
        return np.sqrt(np.maximum(squared, 0))

    def place(self, features: np.ndarray) -> np.ndarray:
        """(N, C) raw features -> (N, 2): where each film sits on the map, as ``nearest`` places
        one (at its nearest training film)."""
        queries = self.standardise(np.atleast_2d(features))
        partial = self.squared_norms[None, :] - 2 * (queries @ self.features.T)
        return self.positions[np.argmin(partial, axis=1)]

    def nearest(self, features: np.ndarray, k: int) -> tuple[list[Neighbour], int, tuple[float, float]]:
        """The k nearest training films, how many of the nearest ``COUNT_K`` have pneumonia,
        and the film's (x, y) on the map."""
        query = self.standardise(features)
        # |f - q|^2 = |f|^2 - 2 f.q + |q|^2: the last term and the root change no order, so the
        # search ranks by the first two and takes exact distances for the few it keeps (the
        # matrix-product form also loses digits near zero)
        partial = self.squared_norms - 2 * (self.features @ query)
        count = min(max(k, COUNT_K), len(partial))
        order = np.argpartition(partial, count - 1)[:count]
        exact = np.linalg.norm(self.features[order] - query, axis=1)
        ranked = np.argsort(exact, kind="stable")
        order, exact = order[ranked], exact[ranked]
        neighbours = [Neighbour(self.ids[i], self.paths[i], CLASS_NAMES[self.labels[i]], float(d))
                      for i, d in zip(order[:k], exact[:k])]
        pneumonia = int(self.labels[order[:COUNT_K]].sum())
        x, y = self.positions[order[0]]
        return neighbours, pneumonia, (float(x), float(y))
