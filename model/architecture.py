"""The architecture's settings, without PyTorch: what a checkpoint records of its network.

``network.py`` builds the network from them; a serving process that runs the exported
graph (``onnx_network.py``) reads them without importing torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

#: Where the population head reads the classifier (``model.population.PopulationHead``): the
#: outputs of these convolutional blocks (0-based), each averaged over a grid x grid layout.
#: The middle blocks: they still see the body's shape and where it lies, which age and view
#: change; the last block has pooled that away for pneumonia (chosen by cross-validation on
#: the fitting films: docs/model.md). A head records the layout it was fitted on.
TAPS = {"blocks": (1, 2), "grid": 2}


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
    def from_dict(cls, data: dict) -> NetworkConfig:
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        data["stn_channels"] = tuple(data["stn_channels"])
        return cls(**data)
