"""Out-of-population gate: is this image like the pediatric chest films we trained on?

Two distances, each with a threshold set on validation data:
- feature distance: Mahalanobis distance of the network's penultimate features to the
  nearer class mean (shared, shrunk covariance), which catches images the network
  represents unlike any training film;
- pixel error: how badly a PCA basis of the training inputs reconstructs the 64x64
  input, which catches photos, documents and other modalities whose features may
  happen to fall near a class.
Each distance is divided by its validation scale (a high quantile); ``ood_score`` is
the length of that 2-vector divided by the same quantile of the validation scores,
so an image far out on either axis, or moderately out on both, scores above 1: out
of population.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OODGate:
    class_means: np.ndarray  # (2, D)
    precision: np.ndarray  # (D, D) inverse of the shared covariance
    pixel_mean: np.ndarray  # (P,)
    pixel_components: np.ndarray  # (K, P), orthonormal rows
    feature_scale: float
    pixel_scale: float
    threshold: float = 1.0
    rule: str = ""

    def feature_distance(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        distances = []
        for mean in self.class_means:
            delta = features - mean
            # one BLAS product, not a three-way einsum
            distances.append(np.sum((delta @ self.precision) * delta, axis=1))
        return np.sqrt(np.maximum(np.min(distances, axis=0), 0))

    def pixel_error(self, inputs: np.ndarray) -> np.ndarray:
        """RMS of what the basis leaves out; its rows are orthonormal, so the residual's
        squared length is the input's less its projection's (one product, not two)."""
        flat = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1) - self.pixel_mean
        projection = flat @ self.pixel_components.T
        residual = np.einsum("np,np->n", flat, flat) - np.einsum("nk,nk->n", projection, projection)
        return np.sqrt(np.maximum(residual, 0) / flat.shape[1])

    def scores(self, features: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        combined = np.hypot(
            self.feature_distance(features) / self.feature_scale,
            self.pixel_error(inputs) / self.pixel_scale,
        )
        return combined / self.threshold

    def to_dict(self) -> dict:
        import torch  # the checkpoint's format; only what writes one gets here

        return {
            "class_means": torch.from_numpy(np.asarray(self.class_means, dtype=np.float32)),
            "precision": torch.from_numpy(np.asarray(self.precision, dtype=np.float32)),
            "pixel_mean": torch.from_numpy(np.asarray(self.pixel_mean, dtype=np.float32)),
            "pixel_components": torch.from_numpy(np.asarray(self.pixel_components, dtype=np.float32)),
            "feature_scale": float(self.feature_scale),
            "pixel_scale": float(self.pixel_scale),
            "threshold": float(self.threshold),
            "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, data: dict) -> OODGate:
        names = ("class_means", "precision", "pixel_mean", "pixel_components")
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in names}
        gate = cls(**arrays, feature_scale=float(data["feature_scale"]), pixel_scale=float(data["pixel_scale"]),
                   threshold=float(data["threshold"]), rule=str(data.get("rule", "")))
        if min(gate.feature_scale, gate.pixel_scale, gate.threshold) <= 0:
            raise ValueError("gate scales and threshold must be positive")
        if gate.precision.shape != (gate.class_means.shape[1],) * 2:
            raise ValueError("gate precision does not match its class means")
        return gate
