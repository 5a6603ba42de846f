"""The pneumonia model: preprocessing, network, checkpoint and predictor.

Knows nothing of Flask or of training; ``app`` and ``training`` import from here.
"""
from .checkpoint import CLASS_NAMES, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .network import Ensemble, Inference, NetworkConfig, PneumoniaNet
from .predictor import Prediction, Predictor
from .preprocess import (
    DecodeLimits,
    ImageError,
    ImageTooLargeError,
    InvalidImageError,
    PreprocessParams,
    UnsupportedImageError,
    decode_image,
    preprocess,
)

__all__ = [
    "CLASS_NAMES", "Checkpoint", "CheckpointError", "DecodeLimits", "Ensemble", "ImageError",
    "ImageTooLargeError", "Inference", "InvalidImageError", "NetworkConfig", "PneumoniaNet",
    "Prediction", "Predictor", "PreprocessParams", "UnsupportedImageError", "decode_image",
    "load_checkpoint", "preprocess", "save_checkpoint",
]
