"""Image in -> probability, decision, and the pictures the app shows.

Shared by the web app, the training and evaluation scripts and the t-SNE generator:
every one of them runs the network through ``infer_batches`` or ``Predictor``, so
they all see the same preprocessing, calibration, gate and threshold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from .checkpoint import CLASS_NAMES, Checkpoint, load_checkpoint
from .decode import DecodeLimits
from .network import Inference
from .pixels import stretch
from .preprocess import PreprocessParams, preprocess
from .saliency import grad_cam


class NetworkOutput(NamedTuple):
    """The network's raw answers as arrays, before calibration and gate."""

    logits: np.ndarray  # (N,) float64
    aligned: np.ndarray  # (N, S, S), the STN's output, standardised
    features: np.ndarray  # (N, C)
    theta: np.ndarray  # (N, 2, 3)

    @classmethod
    def of(cls, out: Inference) -> "NetworkOutput":
        return cls(
            out.logits.detach().float().cpu().numpy().astype(np.float64),
            out.aligned[:, 0].detach().float().cpu().numpy(),
            out.features.detach().float().cpu().numpy(),
            out.theta.detach().float().cpu().numpy(),
        )


@torch.inference_mode()
def infer_batches(model, inputs: np.ndarray, batch_size: int = 512, device=None) -> NetworkOutput:
    """Preprocessed (N, S, S) -> raw outputs, in eval mode, in chunks that bound memory."""
    model.eval()
    parts = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)).unsqueeze(1)
        parts.append(NetworkOutput.of(model.infer(x if device is None else x.to(device))))
    return NetworkOutput(*(np.concatenate(column) for column in zip(*parts)))


def calibrate(logits: np.ndarray, calibration: dict) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / calibration["temperature"] + calibration["bias"]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


@dataclass(frozen=True)
class BatchOutput:
    probabilities: np.ndarray  # (N,) calibrated
    aligned: np.ndarray  # (N, S, S) in [0, 1]
    features: np.ndarray  # (N, C)
    ood_scores: np.ndarray | None  # (N,), > 1 is out of population; None without a gate
    theta: np.ndarray  # (N, 2, 3), the spatial transformer's affine transform


@dataclass(frozen=True)
class Prediction:
    probability: float
    label: str  # "PNEUMONIA" or "NORMAL"
    threshold: float
    model_input: np.ndarray  # float32 (S, S) in [0, 1], what the network was given
    aligned: np.ndarray  # float32 (S, S) in [0, 1], after the spatial transformer
    ood_score: float | None = None
    saliency: np.ndarray | None = None  # float32 (S, S) in [0, 1], over ``aligned``

    @property
    def is_pneumonia(self) -> bool:
        return self.label == CLASS_NAMES[1]

    @property
    def in_distribution(self) -> bool | None:
        return None if self.ood_score is None else self.ood_score <= 1.0


class Predictor:
    """Holds one loaded checkpoint; safe to share between threads (no state changes)."""

    def __init__(self, checkpoint: Checkpoint, limits: DecodeLimits = DecodeLimits()):
        self.checkpoint = checkpoint
        self.limits = limits
        self.model = checkpoint.model.eval()

    @classmethod
    def from_path(cls, path: str | os.PathLike, limits: DecodeLimits = DecodeLimits()) -> "Predictor":
        return cls(load_checkpoint(path, expected_preprocess=PreprocessParams()), limits)

    @property
    def threshold(self) -> float:
        return self.checkpoint.threshold

    @property
    def version(self) -> str:
        return self.checkpoint.version

    def preprocess(self, image: bytes | np.ndarray) -> np.ndarray:
        return preprocess(image, self.checkpoint.preprocess, self.limits)

    @cached_property
    def works(self) -> bool:
        """One forward pass on a flat gray image gives a finite probability (checked once)."""
        side = self.checkpoint.preprocess.size
        return bool(np.isfinite(self.predict_many(np.full((1, side, side), 0.5, np.float32)).probabilities).all())

    def predict_many(self, inputs: np.ndarray, batch_size: int = 512) -> BatchOutput:
        """Preprocessed (N, S, S) -> calibrated probabilities, aligned images, features, gate scores."""
        return self._finish(infer_batches(self.model, inputs, batch_size), inputs)

    def predict(self, image: bytes | np.ndarray, saliency: bool = False) -> Prediction:
        """Raises ``model.ImageError`` (with a user-facing message) for unusable input.

        With ``saliency`` the one forward pass runs with gradients, and the Grad-CAM
        map comes from its activations.
        """
        model_input = self.preprocess(image)
        heat = None
        if saliency:
            with torch.enable_grad():
                out = self.model.infer(torch.from_numpy(model_input[None, None]))
                heat = grad_cam(out, model_input.shape[-1])[0]
            raw = NetworkOutput.of(out)
        else:
            raw = infer_batches(self.model, model_input[None])
        batch = self._finish(raw, model_input[None])
        probability = float(batch.probabilities[0])
        return Prediction(
            probability=probability,
            label=CLASS_NAMES[1] if probability >= self.threshold else CLASS_NAMES[0],
            threshold=self.threshold,
            model_input=model_input,
            aligned=batch.aligned[0],
            ood_score=None if batch.ood_scores is None else float(batch.ood_scores[0]),
            saliency=heat,
        )

    def _finish(self, raw: NetworkOutput, inputs: np.ndarray) -> BatchOutput:
        gate = self.checkpoint.gate
        return BatchOutput(
            probabilities=calibrate(raw.logits, self.checkpoint.calibration),
            aligned=np.stack([stretch(a) for a in raw.aligned]) if len(raw.aligned) else raw.aligned,
            features=raw.features,
            ood_scores=gate.scores(raw.features, inputs) if gate is not None else None,
            theta=raw.theta,
        )
