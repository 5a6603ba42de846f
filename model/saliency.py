"""Grad-CAM: where in the aligned image the CNN found its evidence for pneumonia.

Gradients of the pneumonia logit with respect to the last convolutional block's
activations (``Inference.activations``, from the same forward pass that gave the
probability) weight those activations; the positive part, upsampled, is the map. It
lives in the spatial transformer's output frame, so it is drawn over the aligned
image. For an ensemble the members' maps are averaged (the gradient of the mean
logit is each member's own, divided by their number).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .network import Inference


def grad_cam(out: Inference, size: int) -> np.ndarray:
    """Maps (N, size, size) in [0, 1] from a forward pass run with gradients enabled.

    ``torch.autograd.grad`` asks for the activations' gradients only: no parameter
    gradient is stored and no hook is set, so concurrent requests cannot interfere.
    """
    gradients = torch.autograd.grad(out.logits.sum(), out.activations)
    cams = sum(
        F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1, keepdim=True))
        for gradient, activation in zip(gradients, out.activations)
    )
    cams = F.interpolate(cams, size=(size, size), mode="bilinear", align_corners=False)[:, 0].detach().numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    return (cams / np.maximum(peak, 1e-8)).astype(np.float32)
