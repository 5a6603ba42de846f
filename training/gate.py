"""Fit the out-of-population gate (``model.gate.OODGate``) on training data alone.

Class means and a Ledoit-Wolf shrunk covariance of the training features, and a PCA
basis of the training inputs; the scales and the threshold are a high quantile of the
validation split's distances, so that nearly every film like the training films passes.
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
    margin: float = 1.0,
) -> OODGate:
    train_features = np.asarray(train_features, dtype=np.float64)
    means = np.stack([train_features[train_labels == c].mean(axis=0) for c in (0, 1)])
    centred = train_features - means[train_labels]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    flat = np.asarray(train_inputs, dtype=np.float64).reshape(len(train_inputs), -1)
    pca = PCA(n_components=min(components, len(flat) - 1), random_state=0).fit(flat)
    gate = OODGate(means, precision, pca.mean_, pca.components_, 1.0, 1.0)
    gate.feature_scale = float(np.quantile(gate.feature_distance(val_features), quantile))
    gate.pixel_scale = float(np.quantile(gate.pixel_error(val_inputs), quantile))
    gate.threshold = margin * float(np.quantile(gate.scores(val_features, val_inputs), quantile))
    gate.rule = (
        f"the combined distance (feature Mahalanobis over {train_features.shape[1]} dimensions and pixel "
        f"PCA-{pca.n_components_} reconstruction error, each scaled by its {quantile:.1%} validation quantile) "
        f"above {f'{margin:g} x ' if margin != 1 else ''}its own {quantile:.1%} validation quantile"
    )
    return gate
