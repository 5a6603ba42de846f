"""The pneumonia model: decoding, preprocessing, network, checkpoint and predictor.

Knows nothing of Flask or of training; ``app`` and ``training`` import from here.
Imports run one way, from the leaves up:

    settings, errors -> pixels -> dicom -> decode -> preprocess
    architecture -> network -> inference (the CPU-fast copy), saliency, population_nets;
    architecture, gate, population, atomic -> checkpoint -> predictor -> onnx_network, serving_file;
    atomic -> tsne_map

Serving never imports PyTorch: the modules on its path import it inside the functions
that train, write checkpoints or run the PyTorch network, and the names below that are
PyTorch's own (the network's classes) load it on first use.
"""
import importlib

from .architecture import NetworkConfig
from .checkpoint import CLASS_NAMES, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .decode import DecodeLimits, RequestBudget, decode_image
from .errors import ImageError, ImageTooLargeError, InvalidImageError, UnreadableFileError, UnsupportedImageError
from .predictor import BatchOutput, NetworkOutput, Prediction, Predictor, calibrate, infer_batches, prior_shift
from .preprocess import PreprocessParams, preprocess
from .tsne_map import TsneMap, TsneMapError

__all__ = [
    "CLASS_NAMES", "BatchOutput", "Checkpoint", "CheckpointError", "DecodeLimits", "Ensemble", "ImageError",
    "ImageTooLargeError", "Inference", "InvalidImageError", "NetworkConfig", "NetworkOutput", "PneumoniaNet",
    "Prediction", "Predictor", "PreprocessParams", "RequestBudget", "TsneMap", "TsneMapError", "UnreadableFileError",
    "UnsupportedImageError",
    "calibrate", "decode_image", "for_inference", "infer_batches", "load_checkpoint", "preprocess", "prior_shift",
    "save_checkpoint",
]

#: Names that need PyTorch, and the module that holds each: imported when first asked for.
_TORCH_NAMES = {"Ensemble": "network", "Inference": "network", "PneumoniaNet": "network",
                "for_inference": "inference"}


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(f".{_TORCH_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
