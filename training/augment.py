"""Batch augmentation on preprocessed 64x64 tensors, chosen for chest films.

Small rotations, shifts and zooms (patients are not positioned identically), gamma
and blur (exposure and detector sharpness vary between sites), noise, and optionally a
smooth intensity field (exposure that varies across the film). No flips: the heart
sits on the left and the model may rely on anatomy's asymmetry.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F


def augment(
    x: torch.Tensor, generator: torch.Generator, strength: float = 1.0, zoom_strength: float | None = None,
    bias_field: float = 0.0, affine: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (N, 1, S, S) in [0, 1]. Returns a new tensor of the same shape.

    ``zoom_strength`` scales the zoom and aspect ranges alone (default: ``strength``): squashing
    a film to a square imprints its aspect ratio on the anatomy, and in this dataset the
    pneumonia films are the wider ones, so wide aspect changes keep the classifier from
    reading the class off the chest's proportions.

    ``bias_field``: multiply each film by a smooth random field, exp(bias_field / 2 * f) with f
    a random quadratic surface over the film (``intensity_field``); 0 (off) draws nothing, so
    the other augmentations' random draws stay as they were.

    ``affine``: the (N, 2, 3) warp from ``random_affine``, drawn here when not given (the same
    draws either way); a caller that needs to know the view's geometry draws it first."""
    n = x.shape[0]

    uniform = _uniform_draws(n, generator)

    theta = (random_affine(n, generator, strength, zoom_strength) if affine is None else affine).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)

    gamma = torch.exp(uniform(-0.35, 0.35) * strength).view(n, 1, 1, 1).to(x)
    x = x.clamp(0, 1).pow(gamma)
    if bias_field > 0:
        x = (x * intensity_field(n, x.shape[-1], bias_field, generator).to(x)).clamp(0, 1)

    blur = (torch.rand(n, generator=generator) < 0.3 * strength).view(n, 1, 1, 1).to(x)
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    x = blur * blurred + (1 - blur) * x

    noise = torch.randn(x.shape, generator=generator).to(x) * uniform(0, 0.02).view(n, 1, 1, 1).to(x) * strength
    return (x + noise).clamp(0, 1)


def random_affine(n: int, generator: torch.Generator, strength: float = 1.0,
                  zoom_strength: float | None = None) -> torch.Tensor:
    """(n, 2, 3) ``augment``'s geometric warps in ``affine_grid``'s convention (where each output
    point samples the input): a small rotation, zoom, aspect change and shift."""
    zoom_strength = strength if zoom_strength is None else zoom_strength

    uniform = _uniform_draws(n, generator)

    angle = uniform(-10, 10) * strength * math.pi / 180
    scale = 1 + uniform(-0.1, 0.1) * zoom_strength
    aspect = 1 + uniform(-0.08, 0.08) * zoom_strength
    tx, ty = uniform(-0.07, 0.07) * strength, uniform(-0.07, 0.07) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos * aspect, -sin, tx], 1), torch.stack([sin * aspect, cos, ty], 1)], 1)


def _uniform_draws(n: int, generator: torch.Generator) -> Callable[[float, float], torch.Tensor]:
    """uniform(low, high): one draw a film from ``generator``, in the order of the calls."""
    return lambda low, high: low + (high - low) * torch.rand(n, generator=generator)


def then(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3): the warp of sampling with ``first`` and then sampling that with ``second``
    (a point p of the result reads the original at first(second(p)))."""
    bottom = torch.tensor([0.0, 0.0, 1.0]).to(first).expand(first.shape[0], 1, 3)
    return (torch.cat([first, bottom], 1) @ torch.cat([second, bottom.to(second)], 1))[:, :2]


def intensity_field(n: int, side: int, amount: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, side, side) smooth multiplicative fields: exp(amount / 2 * f), f = a x + b y + c x y +
    d (x^2 - 1/3) + e (y^2 - 1/3) on [-1, 1]^2 with standard normal coefficients. Exposure that
    brightens one side or the middle of a film (tube angle, body thickness, a site's processing)
    changes no diagnosis; with no field in training a model may read it as opacity."""
    axis = torch.linspace(-1, 1, side)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    basis = torch.stack([x, y, x * y, x**2 - 1 / 3, y**2 - 1 / 3])  # (5, side, side), each of mean ~0
    coefficients = torch.randn(n, 5, generator=generator)
    return torch.exp(amount / 2 * torch.einsum("nk,khw->nhw", coefficients, basis)).unsqueeze(1)


def tighter_framing(x: torch.Tensor, chosen: torch.Tensor, amount: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, 1, S, S); the films where ``chosen`` is true cut by up to ``amount`` of the side at the top
    and at the bottom and half that at each side, and brought back to S x S: the film a tighter
    collimation would have given. Returns the films and the (N, 2, 3) warps (identity where not cut).

    Meant for normal films alone (``--framing-cut``): in this dataset the pneumonia films are
    framed tighter, and the model reads a tight framing as pneumonia; framing normal films
    tighter too leaves the framing no class to tell (docs/experiments.md: what it cost)."""
    n = x.shape[0]
    top, bottom, left, right = (torch.rand(n, 4, generator=generator) * amount
                                * torch.tensor([1.0, 1.0, 0.5, 0.5]) * chosen[:, None]).unbind(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = 1 - left - right, left - right
    theta[:, 1, 1], theta[:, 1, 2] = 1 - top - bottom, top - bottom
    if not chosen.any():
        return x, theta
    cut = x[chosen]
    grid = F.affine_grid(theta[chosen].to(x), list(cut.shape), align_corners=False)
    out = x.clone()
    out[chosen] = F.grid_sample(cut, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out, theta
