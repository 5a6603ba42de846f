"""Grad-CAM: where in the aligned image the CNN found its evidence for pneumonia.

Gradients of the pneumonia logit with respect to the last convolutional block's
activations weight those activations; the positive part, upsampled, is the map.
It lives in the spatial transformer's output frame, so it is drawn over the
aligned image. For an ensemble the members' maps are averaged.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .network import Ensemble, PneumoniaNet


def _member_cam(net: PneumoniaNet, x: torch.Tensor) -> torch.Tensor:
    """The forward pass, split open at the last block's final ReLU (no hooks and no
    parameter gradients, so concurrent requests cannot interfere)."""
    blocks = len(net.config.channels)
    aligned, _ = net.stn(net.standardise(x))
    hidden = net.features[: blocks - 1](aligned)
    last = net.features[blocks - 1]
    activation = last[:6](hidden)  # conv, bn, relu, conv, bn, relu
    features = net.features[blocks:](last[6:](activation))
    logits = net.head(features).squeeze(1)
    (gradient,) = torch.autograd.grad(logits.sum(), activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def grad_cam(model: Ensemble, inputs: np.ndarray) -> np.ndarray:
    """Preprocessed (N, S, S) -> maps (N, S, S) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).unsqueeze(1)
    with torch.enable_grad():
        cams = torch.stack([_member_cam(member, x) for member in model.members]).mean(dim=0).detach().numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    return (cams / np.maximum(peak, 1e-8)).astype(np.float32)
