"""Spatial transformer in front of a small CNN that ends in one pneumonia logit.

The STN learns an affine warp that undoes the tilt, shift and zoom of a skewed film
before the classifier looks at it; it starts as the identity so that early training
sees the image as it is.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class NetworkConfig:
    """The architecture's hyperparameters; stored in the checkpoint."""

    input_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 128)
    stn_channels: tuple[int, ...] = (8, 16, 32)
    dropout: float = 0.3
    #: False holds the transform at the identity (the ablation that measures what the STN is worth)
    stn: bool = True

    @property
    def tap_width(self) -> int:
        """How many numbers one network's ``Inference.taps`` hold for a film."""
        return TAPS["grid"] ** 2 * sum(self.channels[block] for block in TAPS["blocks"])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["stn_channels"] = list(self.stn_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkConfig":
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        data["stn_channels"] = tuple(data["stn_channels"])
        return cls(**data)


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


#: Where the population head reads the classifier (``model.population.PopulationHead``): the
#: outputs of these convolutional blocks (0-based), each averaged over a grid x grid layout.
#: The middle blocks: they still see the body's shape and where it lies, which age and view
#: change; the last block has pooled that away for pneumonia (in cross-validation on the
#: fitting films a head on it refused 73-85% of adults, on these 97.1-97.8%). A head records
#: the layout it was fitted on.
TAPS = {"blocks": (1, 2), "grid": 2}


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
        if torch.is_grad_enabled():
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        else:
            grid = affine_grid(theta, *x.shape[-2:])
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False), theta


_BASE_GRIDS: dict[tuple, torch.Tensor] = {}


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, height, width), align_corners=False)`` for inference.

    That builds the untransformed pixel grid anew on every call and applies theta with a
    batched matrix product (87 us for one 64 px image, one thread); here the grid is built
    once per size and theta is applied with six multiply-adds over it (16 us). Not for
    training: the cached grid is made without autograd.
    """
    key = (height, width, theta.device, theta.dtype)
    base = _BASE_GRIDS.get(key)
    if base is None:
        identity = IDENTITY.to(theta)[None]
        base = _BASE_GRIDS[key] = F.affine_grid(identity, [1, 1, height, width], align_corners=False)[0]
    x, y = base[..., 0], base[..., 1]  # (H, W) each
    t = theta[:, :, :, None, None]  # (N, 2, 3, 1, 1): each coefficient broadcasts over the grid
    return torch.stack([x * t[:, 0, 0] + y * t[:, 0, 1] + t[:, 0, 2], x * t[:, 1, 0] + y * t[:, 1, 1] + t[:, 1, 2]], dim=-1)


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
            activation = block.forward(activation)  # no hooks here (``DirectSequential``)
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


def fold_batchnorm(sequence: nn.Sequential) -> nn.Sequential:
    """A copy in which each BatchNorm that follows a convolution is folded into it.

    In eval mode BatchNorm is a fixed scale and shift per channel, which the convolution's
    weights and bias absorb: the same function, without a pass over the activations for
    each BatchNorm. For inference only: the copy would not train as the original does.
    """
    layers: list[nn.Module] = []
    for module in sequence:
        if isinstance(module, nn.BatchNorm2d) and layers and isinstance(layers[-1], nn.Conv2d):
            layers[-1] = fuse_conv_bn_eval(layers[-1], module)
        elif isinstance(module, nn.Sequential):
            layers.append(fold_batchnorm(module))
        else:
            layers.append(copy.deepcopy(module))
    return nn.Sequential(*layers)


def for_inference(model: Ensemble) -> Ensemble:
    """A copy of ``model`` as the app and the scripts run it: eval mode, BatchNorm folded into
    the convolutions, channels-last (``to_channels_last``)."""
    model = copy.deepcopy(model).eval()
    for member in model.members:
        member.features = fold_batchnorm(member.features)
    return to_channels_last(model)


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its convolutions channels-last (oneDNN's convolutions, the ReLUs and
    the max pools run faster so), each one followed by a ReLU made a ``FusedConvReLU``, and
    its sequences made ``DirectSequential``: an inference copy, which nothing hooks into."""
    module.to(memory_format=torch.channels_last)
    for parent in list(module.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        if type(parent) is nn.Sequential:
            parent.__class__ = DirectSequential  # the same layers and state; only ``forward`` differs
        if not FusedConvReLU.available():
            continue
        for index in reversed(range(len(parent) - 1)):  # from the end, so a deletion moves no layer still to visit
            if type(parent[index]) is nn.Conv2d and isinstance(parent[index + 1], nn.ReLU):
                parent[index] = FusedConvReLU(parent[index])
                del parent[index + 1]  # the ReLU is in the convolution now (an empty module call costs ~5 us)
    return module


class DirectSequential(nn.Sequential):
    """``nn.Sequential`` that calls each layer's ``forward`` itself, without ``Module.__call__``
    (its hook checks cost 2-4 us a layer, and a prediction passes some 40 layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer.forward(x)
        return x


class FusedConvReLU(nn.Module):
    """A convolution and the ReLU after it, for inference: oneDNN's convolution with the ReLU
    fused in and the weights laid out once for the input's shape and the thread count.

    Otherwise PyTorch sends a single image's small convolutions to its im2col kernel, or to
    oneDNN with the weights reordered on every call, and runs the ReLU as a pass of its own;
    a batch's go to oneDNN with the weights reordered on every call. A network's first
    convolution (one input channel) gains most: 80-110 us against 170-240 for 8 to 32
    channels at 64 px, one thread. A prediction takes 6-10% less time; a film in a batch of
    20 or 512, 20-46% less, of 2 to 4, 2-17% less (interleaved A/Bs, README); the same answers.
    The oneDNN operators are those PyTorch's own compiler emits (``torch.ops.mkldnn``); where
    a build lacks them, ``to_channels_last`` keeps the plain convolution.
    """

    # Layouts kept at once, one per batch size and thread count seen (the served networks'
    # weights take 1.8 MB a layout): more than a server meets (1-4 films coalesced, up to 20
    # in a batch request, 512 in the scripts); past it the cache starts again, never grows.
    MAX_PACKED = 16

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"not a zero-padded convolution with explicit padding: {conv}")
        self.conv = conv
        self.settings = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        # (input shape, torch threads) -> weights in oneDNN's layout, which depends on how the
        # work divides among threads: weights packed in a gunicorn master (two threads) and
        # run in its workers (one) were reordered on every call, a prediction 3x as long.
        self.packed: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weights behind (oneDNN's layout has no storage
        to copy); they are packed again on first use."""
        return {**self.__dict__, "packed": {}}

    @staticmethod
    def available() -> bool:
        ops = torch.ops.mkldnn
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise")
                and hasattr(ops, "_reorder_convolution_weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.relu(self.conv(x))
        shape = tuple(x.shape)
        key = (shape, torch.get_num_threads())
        weight = self.packed.get(key)
        if weight is None:
            if len(self.packed) >= self.MAX_PACKED:
                self.packed.clear()  # one call: safe while other threads read the dict
            weight = torch.ops.mkldnn._reorder_convolution_weight(self.conv.weight.detach(), *self.settings, list(shape))
            self.packed[key] = weight
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.conv.bias, *self.settings, "relu", [], "")
