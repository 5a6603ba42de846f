"""Grad-CAM: where in the aligned image the CNN found its evidence for pneumonia.

The last convolutional block's activations (``Inference.activations``, from the same
forward pass that gave the probability), weighted by the mean gradient of the
pneumonia logit over each channel's map; the positive part, upsampled, is the map.
For this network's head that mean gradient is a constant of the weights
(``PneumoniaNet.channel_weights``), so the map needs no backward pass: it costs what
a weighted sum of the activations costs. It lives in the spatial transformer's
output frame, so it is drawn over the aligned image. For an ensemble the members'
maps are added before scaling (the gradient of the mean logit is each member's own,
divided by their number).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .network import Ensemble, Inference


@torch.inference_mode()
def grad_cam(model: Ensemble, out: Inference, size: int) -> np.ndarray:
    """Maps (N, size, size) in [0, 1] from the forward pass ``out`` of ``model``."""
    weights = model.channel_weights(out.activations)
    cams = sum(
        F.relu(torch.einsum("nchw,c->nhw", activation.float(), weight.float())).unsqueeze(1)
        for weight, activation in zip(weights, out.activations)
    )
    cams = F.interpolate(cams, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    return (cams / np.maximum(peak, 1e-8)).astype(np.float32)
