"""Batch augmentation on preprocessed 64x64 tensors, chosen for chest films.

Small rotations, shifts and zooms (patients are not positioned identically), gamma
and blur (exposure and detector sharpness vary between sites), noise. No flips: the
heart sits on the left and the model may rely on anatomy's asymmetry.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def augment(
    x: torch.Tensor, generator: torch.Generator, strength: float = 1.0, zoom_strength: float | None = None
) -> torch.Tensor:
    """x: (N, 1, S, S) in [0, 1]. Returns a new tensor of the same shape.

    ``zoom_strength`` scales the zoom and aspect ranges alone (default: ``strength``): squashing
    a film to a square imprints its aspect ratio on the anatomy, and in this dataset the
    pneumonia films are the wider ones, so wide aspect changes keep the classifier from
    reading the class off the chest's proportions."""
    zoom_strength = strength if zoom_strength is None else zoom_strength
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-10, 10) * strength * math.pi / 180
    scale = 1 + uniform(-0.1, 0.1) * zoom_strength
    aspect = 1 + uniform(-0.08, 0.08) * zoom_strength
    tx, ty = uniform(-0.07, 0.07) * strength, uniform(-0.07, 0.07) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * aspect, -sin, tx], 1), torch.stack([sin * aspect, cos, ty], 1)], 1
    ).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)

    gamma = torch.exp(uniform(-0.35, 0.35) * strength).view(n, 1, 1, 1).to(x)
    x = x.clamp(0, 1).pow(gamma)

    blur = (torch.rand(n, generator=generator) < 0.3 * strength).view(n, 1, 1, 1).to(x)
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    x = blur * blurred + (1 - blur) * x

    noise = torch.randn(x.shape, generator=generator).to(x) * uniform(0, 0.02).view(n, 1, 1, 1).to(x) * strength
    return (x + noise).clamp(0, 1)
