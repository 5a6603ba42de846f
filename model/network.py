"""Spatial transformer in front of a small CNN that ends in one pneumonia logit.

The STN learns an affine warp that undoes the tilt, shift and zoom of a skewed film
before the classifier looks at it; it starts as the identity so that early training
sees the image as it is.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .architecture import TAPS, NetworkConfig  # noqa: F401 - the architecture's settings

IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


class Inference(NamedTuple):
    logits: torch.Tensor  # (N,)
    aligned: torch.Tensor  # (N, 1, H, W), the STN's output, standardised
    features: torch.Tensor  # (N, C), the penultimate layer
    theta: torch.Tensor  # (N, 2, 3), the affine transform
    #: per member, the last convolutional block's output (N, C, h, w) before pooling:
    #: what Grad-CAM weighs, so the heat map needs no second pass
    activations: tuple[torch.Tensor, ...] = ()
    #: (N, D) the middle blocks' outputs averaged over a coarse grid (``TAPS``), every member's:
    #: what the population head reads
    taps: torch.Tensor | None = None




def _conv_block(cin: int, cout: int, pool: bool = True) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class SpatialTransformer(nn.Module):
    """Localisation net -> 6 affine parameters -> affine_grid / grid_sample."""

    def __init__(self, input_size: int, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.localisation = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.regressor = nn.Sequential(nn.Linear(cin * 16, 32), nn.ReLU(inplace=True), nn.Linear(32, 6))
        # Identity at start: zero weights, identity bias.
        nn.init.zeros_(self.regressor[-1].weight)
        with torch.no_grad():
            self.regressor[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.regressor(self.localisation(x)).view(-1, 2, 3)
        grid = self.sampling_grid(theta, *x.shape[-2:])
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False), theta

    @staticmethod
    def sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Where each output pixel samples the input (``model.inference`` caches its base for serving)."""
        return F.affine_grid(theta, [theta.shape[0], 1, height, width], align_corners=False)


class PneumoniaNet(nn.Module):
    """Input: (N, 1, S, S) floats in [0, 1] from ``model.preprocess``. Output: logits (N,)."""

    def __init__(self, config: NetworkConfig = NetworkConfig()):
        super().__init__()
        self.config = config
        self.stn = SpatialTransformer(config.input_size, config.stn_channels)
        blocks, cin = [], 1
        for i, cout in enumerate(config.channels):
            blocks.append(_conv_block(cin, cout, pool=i < len(config.channels) - 1))
            cin = cout
        # ``features`` ends at the last block's ReLU (Grad-CAM's activation); its max
        # pool moved into ``pool``, which holds no weights, so checkpoints still load.
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(cin, 1))

    @staticmethod
    def standardise(x: torch.Tensor) -> torch.Tensor:
        """Per-image zero mean, unit variance: exposure differs from film to film."""
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-5)

    def infer(self, x: torch.Tensor) -> Inference:
        if self.config.stn:
            aligned, theta = self.stn(self.standardise(x))
        else:
            aligned = self.standardise(x)
            theta = IDENTITY.to(x).expand(x.shape[0], 2, 3)
        activation, taps = aligned, []
        for index, block in enumerate(self.features):
            activation = block.forward(activation)  # nothing hooks into the blocks: skip Module.__call__
            if index in TAPS["blocks"]:
                taps.append(F.adaptive_avg_pool2d(activation, TAPS["grid"]).flatten(1))
        features = self.pool(activation)
        logits = self.head(features).squeeze(1)
        return Inference(logits, aligned, features, theta, (activation,), torch.cat(taps, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.infer(x).logits

    def channel_weights(self, activation: torch.Tensor) -> torch.Tensor:
        """(C,) the mean over the map of d logit / d ``activation``, the weights Grad-CAM gives its channels.

        The same for every image, so no backward pass is needed: after ``features`` come a
        2x2 max pool (each window hands its whole gradient to its largest value), a global
        average and one linear unit, so the gradients of channel c sum to that unit's weight
        w_c over the map, and their mean is w_c / (h * w).
        """
        height, width = activation.shape[-2:]
        return self.head[-1].weight[0] / (height * width)


class Ensemble(nn.Module):
    """Several independently trained networks; their logits are averaged.

    A single network is an ensemble of one, so the app and the scripts never branch.
    The aligned image shown to users is the first member's; features are concatenated.
    """

    def __init__(self, members: list[PneumoniaNet]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def infer(self, x: torch.Tensor) -> Inference:
        outputs = [member.infer(x) for member in self.members]
        logits = torch.stack([o.logits for o in outputs]).mean(dim=0)
        features = torch.cat([o.features for o in outputs], dim=1)
        activations = tuple(a for o in outputs for a in o.activations)
        taps = torch.cat([o.taps for o in outputs], dim=1)
        return Inference(logits, outputs[0].aligned, features, outputs[0].theta, activations, taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.infer(x).logits

    def channel_weights(self, activations: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Per member, ``PneumoniaNet.channel_weights`` for the mean logit (each member's over their number)."""
        return [member.channel_weights(a) / len(self.members) for member, a in zip(self.members, activations)]
