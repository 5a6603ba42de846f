"""The trained network made fast for CPU inference, computing the same function.

``for_inference`` copies a network and folds each BatchNorm into the convolution before
it, lays the weights out channels-last, runs each convolution and its ReLU as one oneDNN
call (``FusedConvReLU``), calls the layers of a sequence directly (``DirectSequential``)
and builds the transformer's untransformed sampling grid once per size.

The fused convolution uses operators that PyTorch registers for its own compiler
(``torch.ops.mkldnn``), not a public API. They are looked up here and nowhere else
(``onednn_ops``); where a build lacks them, or one fails when called, the plain
convolution and ReLU run instead and give the same answers.
"""
from __future__ import annotations

import copy
import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .network import IDENTITY, SpatialTransformer

log = logging.getLogger(__name__)

#: The private oneDNN operators: a convolution with a fused pointwise op, and the reorder of
#: its weights into the layout that convolution wants.
ONEDNN_OPS = ("_convolution_pointwise", "_reorder_convolution_weight")

_disabled = False  # set when an operator failed at run time: the plain path from then on


def onednn_ops() -> tuple | None:
    """The two operators of ``ONEDNN_OPS``, or None where this torch build lacks them or they
    failed once when called."""
    return None if _disabled else lookup_onednn_ops()


@functools.cache
def lookup_onednn_ops() -> tuple | None:
    """Looked up once a process (``cache_clear`` looks again)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return tuple(getattr(torch.ops.mkldnn, name) for name in ONEDNN_OPS)
    except (AttributeError, RuntimeError):
        return None


def for_inference(model: nn.Module) -> nn.Module:
    """A copy of an ``Ensemble`` as the app and the scripts run it: eval mode, BatchNorm
    folded into the convolutions, channels-last, fused convolutions, the cached grid."""
    model = copy.deepcopy(model).eval()
    for member in model.members:
        member.features = fold_batchnorm(member.features)
        member.stn.__class__ = CachedGridTransformer  # the same layers and state; only the grid differs
    return to_channels_last(model)


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


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its convolutions channels-last (oneDNN's convolutions, the ReLUs and
    the max pools run faster so), each one followed by a ReLU made a ``FusedConvReLU`` where
    the operators exist, and its sequences made ``DirectSequential``: an inference copy,
    which nothing hooks into."""
    module.to(memory_format=torch.channels_last)
    fuse = FusedConvReLU.available()
    for parent in list(module.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        if type(parent) is nn.Sequential:
            parent.__class__ = DirectSequential  # the same layers and state; only ``forward`` differs
        if not fuse:
            continue
        for index in reversed(range(len(parent) - 1)):  # from the end, so a deletion moves no layer still to visit
            if type(parent[index]) is nn.Conv2d and isinstance(parent[index + 1], nn.ReLU):
                parent[index] = FusedConvReLU(parent[index])
                del parent[index + 1]  # the ReLU is in the convolution now: no empty module call
    return module


class DirectSequential(nn.Sequential):
    """``nn.Sequential`` that calls each layer's ``forward`` itself, without ``Module.__call__``,
    whose hook checks cost more than some of these small layers' work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer.forward(x)
        return x


_BASE_GRIDS: dict[tuple, torch.Tensor] = {}


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, height, width), align_corners=False)`` for inference.

    That builds the untransformed pixel grid anew on every call and applies theta with a
    batched matrix product; here the grid is built once per size and theta is applied with
    six multiply-adds over it. Not for training: the cached grid is made without autograd.
    """
    key = (height, width, theta.device, theta.dtype)
    base = _BASE_GRIDS.get(key)
    if base is None:
        identity = IDENTITY.to(theta)[None]
        base = _BASE_GRIDS[key] = F.affine_grid(identity, [1, 1, height, width], align_corners=False)[0]
    x, y = base[..., 0], base[..., 1]  # (H, W) each
    t = theta[:, :, :, None, None]  # (N, 2, 3, 1, 1): each coefficient broadcasts over the grid
    return torch.stack([x * t[:, 0, 0] + y * t[:, 0, 1] + t[:, 0, 2],
                        x * t[:, 1, 0] + y * t[:, 1, 1] + t[:, 1, 2]], dim=-1)


class CachedGridTransformer(SpatialTransformer):
    """The spatial transformer of an inference copy: the cached grid when no gradient is needed."""

    @staticmethod
    def sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if torch.is_grad_enabled():
            return SpatialTransformer.sampling_grid(theta, height, width)
        return affine_grid(theta, height, width)


class FusedConvReLU(nn.Module):
    """A convolution and the ReLU after it, for inference: oneDNN's convolution with the ReLU
    fused in and the weights laid out once for the input's shape and the thread count.

    Otherwise PyTorch sends a single image's small convolutions to its im2col kernel, or to
    oneDNN with the weights reordered on every call, and runs the ReLU as a pass of its own;
    a batch's go to oneDNN with the weights reordered on every call. The same answers as
    the plain layers, which run instead when the operators are missing or fail.
    """

    # Layouts kept at once, one per batch size and thread count seen: more than a server
    # meets (1-4 films coalesced, up to 20 in a batch request, 512 in the scripts); past it
    # the cache starts again, never grows.
    MAX_PACKED = 16

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"not a zero-padded convolution with explicit padding: {conv}")
        self.conv = conv
        self.settings = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        # (input shape, torch threads) -> weights in oneDNN's layout, which depends on how the
        # work divides among threads: weights packed in a gunicorn master (two threads) and
        # run in its workers (one) would be reordered on every call.
        self.packed: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weights behind (oneDNN's layout has no storage
        to copy); they are packed again on first use."""
        return {**self.__dict__, "packed": {}}

    @staticmethod
    def available() -> bool:
        return onednn_ops() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = None
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            ops = onednn_ops()
        if ops is None:
            return F.relu(self.conv(x))
        convolution, reorder = ops
        try:
            return convolution(x, self._weight(x, reorder), self.conv.bias, *self.settings, "relu", [], "")
        except RuntimeError as exc:  # a build whose operator has another signature, or none at run time
            global _disabled
            _disabled = True
            log.warning("oneDNN's fused convolution failed (%s); running plain convolutions from now on", exc)
            return F.relu(self.conv(x))

    def _weight(self, x: torch.Tensor, reorder) -> torch.Tensor:
        key = (tuple(x.shape), torch.get_num_threads())
        weight = self.packed.get(key)
        if weight is None:
            if len(self.packed) >= self.MAX_PACKED:
                self.packed.clear()  # one call: safe while other threads read the dict
            weight = reorder(self.conv.weight.detach(), *self.settings, list(key[0]))
            self.packed[key] = weight
        return weight
