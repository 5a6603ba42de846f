"""A version as a serving process reads it: one ONNX file, no PyTorch.

``training/onnx_export.py`` writes ``versions/<version>.onnx``: the network's graph, and
in the model's metadata (``METADATA_KEY``) the checkpoint less its weights, as JSON:
calibration, threshold, both gates, intended use, the model card's figures, each
member's Grad-CAM channel weights, and the checkpoint's logits on ``check_films``. A
process that loads the file runs those films through the graph and refuses the file
when the logits differ (``CHECK_TOLERANCE``): a graph that is not its checkpoint's never
serves. Arrays travel as base64 of their bytes, with dtype and shape.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, checkpoint_from_dict
from .decode import DecodeLimits
from .preprocess import PreprocessParams

METADATA_KEY = "pneumonia.checkpoint"
#: The most a logit on ``check_films`` may differ from the one the checkpoint gave at export
#: (over the logits' scale where it exceeds 1: ``relative_difference``).
CHECK_TOLERANCE = 1e-4


def check_films(side: int, count: int = 32, seed: int = 46) -> np.ndarray:
    """A fixed set of inputs: smooth film-like fields and noise, in [0, 1] as preprocessing gives."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    smooth = [np.clip(0.5 + 0.4 * np.sin(rng.uniform(1, 6) * x + rng.uniform(0, 3)) * np.cos(rng.uniform(1, 6) * y),
                      0, 1) for _ in range(count // 2)]
    noise = list(rng.random((count - count // 2, side, side)))
    return np.stack(smooth + noise).astype(np.float32)


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest absolute difference, over the expected values' scale where it exceeds 1; inf when the
    shapes differ or a value is not finite."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return float("inf")
    if not expected.size:
        return 0.0
    difference = float(np.abs(got - expected).max()) / max(1.0, float(np.abs(expected).max()))
    return difference if np.isfinite(difference) else float("inf")


def _encode(value):
    """JSON-able: arrays (numpy or PyTorch's, which numpy reads) as dtype, shape and base64."""
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):  # a numpy number stays a number
        return value.item()
    if hasattr(value, "__array__") and not isinstance(value, (int, float, str, bool)):
        array = np.ascontiguousarray(np.asarray(value.detach().cpu() if hasattr(value, "detach") else value))
        return {"__array__": {"dtype": array.dtype.str, "shape": list(array.shape),
                              "data": base64.b64encode(array.tobytes()).decode("ascii")}}
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            spec = value["__array__"]
            array = np.frombuffer(base64.b64decode(spec["data"]), dtype=np.dtype(spec["dtype"]))
            return array.reshape(spec["shape"]).copy()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def metadata(checkpoint: Checkpoint, head_weights: list[np.ndarray], check_logits: np.ndarray) -> str:
    """What the export writes under ``METADATA_KEY``."""
    raw = checkpoint.to_dict()
    raw.pop("state_dicts")
    raw["members"] = len(checkpoint.state_dicts)
    raw["head_weights"] = [np.asarray(w, np.float32) for w in head_weights]
    raw["check"] = {"count": len(check_logits), "logits": np.asarray(check_logits, np.float64)}
    return json.dumps(_encode(raw))


class ServingFile:
    """One version's ONNX file, read: its checkpoint (without weights) and its network."""

    def __init__(self, path: str | os.PathLike, expected_preprocess: PreprocessParams | None = None,
                 threads: int = 1):
        from .onnx_network import OnnxNetwork

        path = Path(path)
        source = f"ONNX file {path.name}"
        if not path.is_file():
            raise CheckpointError(f"{source} not found")
        try:
            network = OnnxNetwork(path.read_bytes(), [], threads)
            raw = _decode(json.loads(network.session.get_modelmeta().custom_metadata_map[METADATA_KEY]))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source} is not a model version's serving file ({type(exc).__name__})") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors for a truncated or foreign file
            raise CheckpointError(f"{source} is truncated or corrupt ({type(exc).__name__})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("members"), int) or raw["members"] < 1:
            raise CheckpointError(f"{source} does not say how many networks it holds")
        self.checkpoint = checkpoint_from_dict(raw, source, expected_preprocess, members=raw["members"])
        network.head_weights = [np.asarray(w, np.float32) for w in raw.get("head_weights", [])]
        if len(network.head_weights) != raw["members"]:
            raise CheckpointError(f"{source} lacks its networks' Grad-CAM weights")
        self.network = network
        self._check(source, raw.get("check") or {})

    def _check(self, source: str, check: dict) -> None:
        expected = np.asarray(check.get("logits", []), np.float64)
        if not len(expected):
            raise CheckpointError(f"{source} holds no check of its graph against its checkpoint")
        films = check_films(self.checkpoint.preprocess.size, len(expected))
        difference = relative_difference(self.network.run(films)[0].logits, expected)
        if not difference <= CHECK_TOLERANCE:
            raise CheckpointError(f"{source}: its graph does not give its checkpoint's answers "
                                  f"(a logit differs by {difference:.2g})")

    def predictor(self, limits: DecodeLimits = DecodeLimits()):
        from .predictor import Predictor

        return Predictor(self.checkpoint, limits, network=self.network)


def graph_beside(checkpoint_path: str | os.PathLike) -> Path:
    """Where a checkpoint file's serving file lies: the same name, ``.onnx``."""
    return Path(checkpoint_path).with_suffix(".onnx")
