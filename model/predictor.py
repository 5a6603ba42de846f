"""Image in -> probability, decision, and the pictures the app shows.

Shared by the web app, the evaluation script and the t-SNE generator so that all of
them go through the same preprocessing, calibration, gate and threshold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import CLASS_NAMES, Checkpoint, load_checkpoint
from .preprocess import DecodeLimits, PreprocessParams, preprocess
from .saliency import grad_cam


@dataclass(frozen=True)
class BatchOutput:
    probabilities: np.ndarray  # (N,) calibrated
    aligned: np.ndarray  # (N, S, S) in [0, 1]
    features: np.ndarray  # (N, C)
    ood_scores: np.ndarray | None  # (N,), > 1 is out of population; None without a gate


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


def calibrate(logits: np.ndarray, calibration: dict) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / calibration["temperature"] + calibration["bias"]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


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

    @torch.inference_mode()
    def predict_batch(self, inputs: np.ndarray) -> BatchOutput:
        """Preprocessed (N, S, S) -> calibrated probabilities, aligned images, features, gate scores."""
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        out = self.model.infer(torch.from_numpy(inputs).unsqueeze(1))
        probabilities = calibrate(out.logits.numpy(), self.checkpoint.calibration)
        aligned = out.aligned[:, 0].numpy()
        low = aligned.min(axis=(1, 2), keepdims=True)
        high = aligned.max(axis=(1, 2), keepdims=True)
        aligned = ((aligned - low) / np.maximum(high - low, 1e-6)).astype(np.float32)
        features = out.features.numpy()
        gate = self.checkpoint.gate
        ood = gate.scores(features, inputs) if gate is not None else None
        return BatchOutput(probabilities, aligned, features, ood)

    def predict_many(self, inputs: np.ndarray, batch_size: int = 512) -> BatchOutput:
        """``predict_batch`` over a whole split, in chunks that bound memory."""
        parts = [self.predict_batch(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        ood = None if parts[0].ood_scores is None else np.concatenate([p.ood_scores for p in parts])
        return BatchOutput(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("probabilities", "aligned", "features")), ood)

    def predict(self, image: bytes | np.ndarray, saliency: bool = False) -> Prediction:
        """Raises ``model.ImageError`` (with a user-facing message) for unusable input."""
        model_input = self.preprocess(image)
        out = self.predict_batch(model_input[None])
        probability = float(out.probabilities[0])
        label = CLASS_NAMES[1] if probability >= self.threshold else CLASS_NAMES[0]
        return Prediction(
            probability=probability,
            label=label,
            threshold=self.threshold,
            model_input=model_input,
            aligned=out.aligned[0],
            ood_score=None if out.ood_scores is None else float(out.ood_scores[0]),
            saliency=grad_cam(self.model, model_input[None])[0] if saliency else None,
        )
