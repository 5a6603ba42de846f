"""Image in -> probability, decision, and the pictures the app shows.

Shared by the web app, the evaluation script and the t-SNE generator so that all of
them go through the same preprocessing and the same threshold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import CLASS_NAMES, Checkpoint, load_checkpoint
from .preprocess import DecodeLimits, PreprocessParams, preprocess


@dataclass(frozen=True)
class Prediction:
    probability: float
    label: str  # "PNEUMONIA" or "NORMAL"
    threshold: float
    model_input: np.ndarray  # float32 (S, S) in [0, 1], what the network was given
    aligned: np.ndarray  # float32 (S, S) in [0, 1], after the spatial transformer

    @property
    def is_pneumonia(self) -> bool:
        return self.label == CLASS_NAMES[1]


class Predictor:
    """Holds one loaded checkpoint; thread-safe for inference (no state changes)."""

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
    def predict_batch(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Preprocessed (N, S, S) -> probabilities (N,), aligned (N, S, S), features (N, C)."""
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).unsqueeze(1)
        out = self.model.infer(x)
        probabilities = torch.sigmoid(out.logits).numpy().astype(np.float64)
        aligned = out.aligned[:, 0].numpy()
        low = aligned.min(axis=(1, 2), keepdims=True)
        high = aligned.max(axis=(1, 2), keepdims=True)
        aligned = (aligned - low) / np.maximum(high - low, 1e-6)
        return probabilities, aligned.astype(np.float32), out.features.numpy()

    def predict(self, image: bytes | np.ndarray) -> Prediction:
        """Raises ``model.ImageError`` (with a user-facing message) for unusable input."""
        model_input = self.preprocess(image)
        probabilities, aligned, _ = self.predict_batch(model_input[None])
        probability = float(probabilities[0])
        label = CLASS_NAMES[1] if probability >= self.threshold else CLASS_NAMES[0]
        return Prediction(probability, label, self.threshold, model_input, aligned[0])
