"""The population gate of checkpoints made before ``population.PopulationHead``: small networks of their own.

They tell a pediatric frontal film from an adult's film and from a lateral view at a
larger cost than the head; kept so that such checkpoints still load and serve under
PyTorch, and no longer fitted. A serving process without PyTorch cannot run them: the
ONNX export refuses such a version (refit its gate with ``training.population``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .inference import fold_batchnorm, to_channels_last
from .network import PneumoniaNet
from .population import KINDS, _assess


class PopulationNet(nn.Module):
    """64x64 input (the model input) -> logits over ``KINDS``. Small: it runs on every upload.

    ``input_pool``: average the input over k x k pixels first (2: a 32 px picture, a
    quarter of the arithmetic; age and view show in the whole body's shape).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 96), dropout: float = 0.2, input_pool: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.AvgPool2d(input_pool)] if input_pool > 1 else []
        cin = 1
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, len(KINDS)))

    standardise = staticmethod(PneumoniaNet.standardise)  # per image, as the pneumonia network's input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.standardise(x)))


class StackedPopulationNets(nn.Module):
    """Several trained ``PopulationNet`` run as one network, for inference: (N, 1, S, S) ->
    (N, members, len(KINDS)) logits, each member's own.

    The members' layers sit side by side as grouped convolutions (one group per member)
    with BatchNorm folded in, so an image is standardised once and passes once; oneDNN
    also takes grouped convolutions for a single image, where it leaves small plain
    ones to a slower path.
    """

    def __init__(self, members: list[PopulationNet]):
        super().__init__()
        count, layers = len(members), []
        bodies = [fold_batchnorm(m.body) for m in members]
        for i, module in enumerate(bodies[0]):
            if isinstance(module, nn.Conv2d):
                groups = count if module.in_channels > 1 else 1  # the first reads the one input channel
                module = nn.Conv2d(module.in_channels * groups, module.out_channels * count, 3, padding=1,
                                   groups=groups)
                module.weight.data = torch.cat([body[i].weight.data for body in bodies])
                module.bias.data = torch.cat([body[i].bias.data for body in bodies])
            layers.append(module)
        self.body = nn.Sequential(*layers).eval()
        self.register_buffer("head_weight", torch.stack([m.head[-1].weight.detach() for m in members]))  # (M, K, C)
        self.register_buffer("head_bias", torch.stack([m.head[-1].bias.detach() for m in members]))  # (M, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(PopulationNet.standardise(x)).view(len(x), *self.head_weight.shape[::2])
        return torch.einsum("nmc,mkc->nmk", features, self.head_weight) + self.head_bias


@dataclass
class PopulationGate:
    """An ensemble of ``PopulationNet``; score = 1 - P(pediatric frontal), averaged over members.

    ``threshold`` is a high quantile of the validation split's scores (children's films),
    so a film scoring above it is refused; the likelier of adult and lateral names why.
    """

    channels: tuple[int, ...]
    state_dicts: list[dict]
    threshold: float
    rule: str = ""
    input_pool: int = 1  # see ``PopulationNet``
    members: list[PopulationNet] = field(default_factory=list, repr=False)
    kind: ClassVar[str] = "networks"

    def __post_init__(self):
        if not self.members:
            for state in self.state_dicts:
                net = PopulationNet(self.channels, input_pool=self.input_pool)
                net.load_state_dict(state)
                self.members.append(net.eval())
        self.stacked = to_channels_last(StackedPopulationNets(self.members))

    @torch.inference_mode()
    def probabilities(self, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """(N, S, S) model inputs -> (N, len(KINDS)) mean class probabilities."""
        parts = []
        for start in range(0, len(inputs), batch_size):
            batch = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
            x = torch.from_numpy(batch).unsqueeze(1)
            parts.append(F.softmax(self.stacked(x), dim=2).mean(dim=1).numpy())
        return np.concatenate(parts) if parts else np.zeros((0, len(KINDS)), np.float32)

    def assess(self, inputs: np.ndarray, taps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores / threshold, kind) per input (``taps`` unused): above 1 is outside, and kind says which way."""
        return _assess(self.probabilities(inputs), self.threshold)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "channels": list(self.channels), "threshold": float(self.threshold),
                "rule": self.rule, "input_pool": int(self.input_pool),
                "state_dicts": [{k: v.detach().cpu().contiguous() for k, v in s.items()} for s in self.state_dicts]}

    @classmethod
    def from_dict(cls, data: dict) -> PopulationGate:
        gate = cls(tuple(data["channels"]), list(data["state_dicts"]), float(data["threshold"]),
                   str(data.get("rule", "")), int(data.get("input_pool", 1)))
        if not 0 < gate.threshold < 1 or not gate.state_dicts:
            raise ValueError("population gate threshold must lie in (0, 1) and it needs weights")
        return gate
