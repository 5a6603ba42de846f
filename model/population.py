"""The population gate on the pixels: is this a young child's frontal chest film?

``PopulationHead`` is a linear read-out of the classifier's own middle activations that
tells a pediatric frontal film from an adult's film and from a lateral view (JPEG and
PNG carry no metadata to say so). Checkpoints made before it carry networks of their
own that do the same at a larger cost (``population_nets``, PyTorch only). The reasons a
film is refused, and the header's checks, are in ``model.intended_use``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .architecture import TAPS

#: The classes the population gate tells apart; only the first is in population.
KINDS = ("pediatric_frontal", "adult", "lateral")


def _assess(probabilities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities -> (score / threshold, the likelier outside kind); score = 1 - P(in population)."""
    kinds = np.array(KINDS)[1 + np.argmax(probabilities[:, 1:], axis=1)]
    return (1.0 - probabilities[:, 0]) / threshold, kinds


@dataclass
class PopulationHead:
    """A softmax over ``KINDS`` on the classifier's middle activations (``network.TAPS``).

    The pneumonia network already sees each film's anatomy: its middle blocks, averaged
    over a 2 x 2 grid, tell children's frontal films from adults' and lateral ones as well
    as two networks trained for it (docs/model.md), so the gate adds a small linear map to
    the forward pass instead of networks of its own. ``weight`` and ``bias`` act on the taps standardised by
    ``mean`` and ``scale``; ``threshold``, as for the networks, is a high quantile of the
    validation split's scores. Fitted on one classifier's activations, it belongs to that
    model version alone.
    """

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (len(KINDS), D)
    bias: np.ndarray  # (len(KINDS),)
    threshold: float
    rule: str = ""
    kind: ClassVar[str] = "head"

    def __post_init__(self):
        arrays = [np.asarray(a, dtype=np.float64) for a in (self.mean, self.scale, self.weight, self.bias)]
        self.mean, self.scale, self.weight, self.bias = arrays
        width = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if (self.scale.shape != (width,) or self.weight.shape != (len(KINDS), width) or self.bias.shape != (len(KINDS),)
                or not (self.scale > 0).all()):
            raise ValueError("population head: mean, scale (> 0), weight and bias do not fit one another")
        if not 0 < self.threshold < 1:
            raise ValueError("population head threshold must lie in (0, 1)")
        # the standardisation folded into one affine map, applied in float32 as the taps come
        self._weight = np.ascontiguousarray((self.weight / self.scale).T, dtype=np.float32)  # (D, K)
        self._bias = (self.bias - (self.weight / self.scale) @ self.mean).astype(np.float32)

    @property
    def width(self) -> int:
        return self.mean.shape[0]

    def probabilities(self, taps: np.ndarray) -> np.ndarray:
        """(N, D) taps -> (N, len(KINDS)) class probabilities."""
        logits = taps @ self._weight + self._bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def assess(self, inputs: np.ndarray, taps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores / threshold, kind) per film (``inputs`` unused): above 1 is outside, and kind says which way."""
        return _assess(self.probabilities(taps), self.threshold)

    @property
    def state_dicts(self) -> list[dict]:
        """The fitted arrays as tensors: what the checkpoint stores and its version digests."""
        import torch  # the checkpoint's format; only what writes one gets here

        return [{name: torch.from_numpy(getattr(self, name).copy()) for name in ("mean", "scale", "weight", "bias")}]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "threshold": float(self.threshold), "rule": self.rule,
                "taps": {"blocks": list(TAPS["blocks"]), "grid": TAPS["grid"]},  # what it was fitted on
                "state_dicts": self.state_dicts}

    @classmethod
    def from_dict(cls, data: dict) -> PopulationHead:
        taps = {"blocks": tuple(data["taps"]["blocks"]), "grid": int(data["taps"]["grid"])}
        if taps != TAPS:
            raise ValueError(f"population head was fitted on activations {taps}; this code gives {TAPS}")
        state = data["state_dicts"][0]
        return cls(*(np.asarray(state[name]) for name in ("mean", "scale", "weight", "bias")), float(data["threshold"]),
                   str(data.get("rule", "")))
