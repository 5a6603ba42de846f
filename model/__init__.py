"""The pneumonia model: decoding, preprocessing, network, checkpoint and predictor.

Knows nothing of Flask or of training; ``app`` and ``training`` import from here.
Imports run one way, from the leaves up:

    settings, errors -> pixels -> dicom -> decode -> preprocess
    network -> inference (the CPU-fast copy), saliency, population;
    gate, atomic -> checkpoint -> predictor;  atomic -> tsne_map
"""
from .checkpoint import CLASS_NAMES, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .decode import DecodeLimits, RequestBudget, decode_image
from .errors import ImageError, ImageTooLargeError, InvalidImageError, UnreadableFileError, UnsupportedImageError
from .inference import for_inference
from .network import Ensemble, Inference, NetworkConfig, PneumoniaNet
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
