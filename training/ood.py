"""Fit the out-of-population gate (``model.gate.OODGate``) on training data alone.

Class means and a Ledoit-Wolf shrunk covariance of the training features, and a PCA
basis of the training inputs; each threshold is a high quantile of the validation
split's distances, so that nearly every film like the training films passes.
"""
from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from model.gate import OODGate


def fit_gate(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    train_inputs: np.ndarray,
    val_features: np.ndarray,
    val_inputs: np.ndarray,
    quantile: float = 0.995,
    components: int = 32,
    margin: float = 1.1,
) -> OODGate:
    train_features = np.asarray(train_features, dtype=np.float64)
    means = np.stack([train_features[train_labels == c].mean(axis=0) for c in (0, 1)])
    centred = train_features - means[train_labels]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    flat = np.asarray(train_inputs, dtype=np.float64).reshape(len(train_inputs), -1)
    pca = PCA(n_components=min(components, len(flat) - 1), random_state=0).fit(flat)
    gate = OODGate(means, precision, pca.mean_, pca.components_, 1.0, 1.0)
    gate.feature_threshold = margin * float(np.quantile(gate.feature_distance(val_features), quantile))
    gate.pixel_threshold = margin * float(np.quantile(gate.pixel_error(val_inputs), quantile))
    gate.rule = (
        f"{margin:g} x the {quantile:.1%} quantile of validation distances, feature (Mahalanobis, "
        f"{train_features.shape[1]} dims) and pixel (PCA-{components} reconstruction error)"
    )
    return gate
