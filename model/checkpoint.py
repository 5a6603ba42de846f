"""One-file checkpoints: weights plus everything needed to use and to trust them.

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``weights_only=True`` (no pickled code runs on load). Saving is atomic: a crash
mid-write leaves the previous file untouched. PyTorch is imported only to read or
write the file and to build the network: a serving process reads the same dict, less
the weights, from the version's ONNX file (``serving_file``) and never imports it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .architecture import NetworkConfig
from .atomic import atomic_write
from .gate import OODGate
from .intended_use import IntendedUse
from .population import PopulationHead
from .preprocess import PreprocessParams

FORMAT_VERSION = 1
CLASS_NAMES = ("NORMAL", "PNEUMONIA")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or incompatible with this code."""


@dataclass
class Checkpoint:
    """What a trained model is, how it was made and how well it did."""

    network: NetworkConfig
    preprocess: PreprocessParams
    state_dicts: list[dict]
    threshold: float
    version: str
    created_at: str
    class_names: tuple[str, ...] = CLASS_NAMES
    threshold_rule: str = ""
    training_data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # {"validation": {...}, "test": {...}}
    #: probability = sigmoid(logit / temperature + bias), fitted on validation data
    calibration: dict = field(default_factory=lambda: {"temperature": 1.0, "bias": 0.0})
    gate: OODGate | None = None
    #: refuses adults' films and lateral views (``population.py``): a head on the network's
    #: activations, or in checkpoints made before it, small networks of its own
    population_gate: PopulationHead | None = None  # or, in old checkpoints, population_nets.PopulationGate
    intended_use: IntendedUse = field(default_factory=IntendedUse)

    @property
    def calibration_prevalence(self) -> float | None:
        """The share of pneumonia among the validation films the probabilities are calibrated to."""
        validation = self.training_data.get("validation", {})
        images, pneumonia = validation.get("images"), validation.get("pneumonia")
        return pneumonia / images if images and pneumonia is not None else None

    @cached_property
    def model(self):
        """The network as PyTorch serves it (``inference.for_inference``), weights loaded; built once."""
        from .inference import for_inference
        from .network import Ensemble, PneumoniaNet

        if not self.state_dicts:
            raise CheckpointError(f"version {self.version} was read without its weights (an ONNX serving file)")
        members = []
        for state in self.state_dicts:
            net = PneumoniaNet(self.network)
            net.load_state_dict(state)
            members.append(net)
        return for_inference(Ensemble(members))

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created_at": self.created_at,
            "network": self.network.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "state_dicts": self.state_dicts,
            "threshold": float(self.threshold),
            "threshold_rule": self.threshold_rule,
            "class_names": list(self.class_names),
            "training_data": self.training_data,
            "metrics": self.metrics,
            "calibration": {k: float(v) for k, v in self.calibration.items()},
            "gate": self.gate.to_dict() if self.gate is not None else None,
            "population_gate": self.population_gate.to_dict() if self.population_gate is not None else None,
            "intended_use": self.intended_use.to_dict(),
        }

    def content_version(self, created: dt.datetime) -> str:
        """Date plus a digest of everything that decides an answer: weights, calibration, gates, threshold."""
        digest = hashlib.sha256()
        states = list(self.state_dicts) + (self.population_gate.state_dicts if self.population_gate else [])
        for state in states:
            for tensor in state.values():
                digest.update(tensor.detach().cpu().numpy().tobytes())
        gate = self.gate
        digest.update(json.dumps({
            "calibration": self.calibration, "threshold": self.threshold, "preprocess": self.preprocess.to_dict(),
            "gate": [gate.feature_scale, gate.pixel_scale, gate.threshold] if gate else None,
            "population": self.population_gate.threshold if self.population_gate else None,
        }, sort_keys=True).encode())
        return f"stn-cnn-{created:%Y%m%d}-{digest.hexdigest()[:8]}"


def population_gate_from_dict(data: dict):
    """Either kind, from a checkpoint: a ``PopulationHead``, or in checkpoints made before it (without a
    ``kind``) networks of their own, which need PyTorch (``population_nets``)."""
    kind = data.get("kind", "networks")
    if kind == "head":
        return PopulationHead.from_dict(data)
    if kind == "networks":
        from .population_nets import PopulationGate

        return PopulationGate.from_dict(data)
    raise ValueError(f"unknown population gate kind {kind!r}")


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically (``atomic_write``): a crash mid-write leaves the previous file."""
    import torch

    path = Path(path)
    payload = checkpoint.to_dict()
    payload["state_dicts"] = [{k: v.detach().cpu().contiguous() for k, v in s.items()} for s in payload["state_dicts"]]
    with atomic_write(path) as handle:
        torch.save(payload, handle)
    return path


class PreprocessMismatch(CheckpointError):
    """The checkpoint was trained on preprocessing other than this code's: it cannot serve here."""


def load_checkpoint(path: str | os.PathLike, expected_preprocess: PreprocessParams | None = None) -> Checkpoint:
    """Read and validate; any problem raises ``CheckpointError`` with a one-line reason.

    ``expected_preprocess``: the caller's preprocessing; a checkpoint trained on other
    inputs is refused rather than silently fed the wrong pictures.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__})") from None
    return checkpoint_from_dict(raw, f"checkpoint {path}", expected_preprocess)


def checkpoint_from_dict(raw, source: str, expected_preprocess: PreprocessParams | None = None,
                         members: int | None = None) -> Checkpoint:
    """``to_dict``'s dict back, checked. ``members``: read without weights (a serving file, whose
    graph holds them), the network's member count, for the population head's width."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} is not a pneumonia model checkpoint")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format version {raw.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    try:
        preprocess = PreprocessParams.from_dict(raw["preprocess"])
        network = NetworkConfig.from_dict(raw["network"])
        checkpoint = Checkpoint(
            network=network,
            preprocess=preprocess,
            state_dicts=list(raw["state_dicts"]) if members is None else [],
            threshold=float(raw["threshold"]),
            version=str(raw["version"]),
            created_at=str(raw["created_at"]),
            class_names=tuple(raw["class_names"]),
            threshold_rule=str(raw.get("threshold_rule", "")),
            training_data=dict(raw.get("training_data", {})),
            metrics=dict(raw.get("metrics", {})),
            calibration={k: float(v) for k, v in raw.get("calibration", {"temperature": 1.0, "bias": 0.0}).items()},
            gate=OODGate.from_dict(raw["gate"]) if raw.get("gate") is not None else None,
            population_gate=population_gate_from_dict(raw["population_gate"]) if raw.get("population_gate") else None,
            intended_use=IntendedUse.from_dict(raw["intended_use"]) if raw.get("intended_use") else IntendedUse(),
        )
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{source} is incompatible with this code: {exc}") from None
    if expected_preprocess is not None and preprocess != expected_preprocess:
        raise PreprocessMismatch(
            f"{source} was trained with preprocessing {preprocess.to_dict()}, "
            f"but this code uses {expected_preprocess.to_dict()}"
        )
    if preprocess.size != network.input_size:
        raise CheckpointError(f"{source}: preprocessing size and network input size differ")
    if not 0.0 < checkpoint.threshold < 1.0:
        raise CheckpointError(f"{source}: threshold {checkpoint.threshold} is not a probability")
    if checkpoint.class_names != CLASS_NAMES:
        raise CheckpointError(f"{source}: classes {checkpoint.class_names} are not {CLASS_NAMES}")
    if set(checkpoint.calibration) != {"temperature", "bias"} or checkpoint.calibration["temperature"] <= 0:
        raise CheckpointError(
            f"{source}: calibration {checkpoint.calibration} is not a valid temperature scaling")
    if members is None:
        if not checkpoint.state_dicts:
            raise CheckpointError(f"{source} holds no weights")
        members = len(checkpoint.state_dicts)
        try:
            checkpoint.model  # noqa: B018 - building it is the check
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{source}: weights do not fit the architecture ({exc})") from None
    head, width = checkpoint.population_gate, network.tap_width * members
    if isinstance(head, PopulationHead) and head.width != width:
        raise CheckpointError(f"{source}: its population head reads {head.width} numbers a film, "
                              f"the network gives {width}")
    return checkpoint
