"""A version's network run by ONNX Runtime (``training/onnx_export.py`` writes the graph).

The same outputs as ``infer_batches`` (logits, aligned film, features, transform, the
population head's taps) and the last block's activations, from which Grad-CAM is a
weighted sum: each member's channel weights are its head's weights over the map's size
(``PneumoniaNet.channel_weights``), read once from the checkpoint. One intra-op thread by
default, as a gunicorn worker runs torch.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from .predictor import NetworkOutput


def onnxruntime():
    """The onnxruntime module, its telemetry off. Its wheels for Linux carry Microsoft's 1DS
    telemetry, which writes a session file to TMPDIR when the library loads and would send
    events: no patient-facing process of ours sends anything anywhere, so it is disabled
    (``ORT_DISABLE_TELEMETRY``, read when the library loads) before the first import."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import onnxruntime as module

    module.disable_telemetry_events()
    return module


def head_weights(checkpoint) -> list[np.ndarray]:
    """Each member's last linear layer (``head.<i>.weight``, the largest i) from a checkpoint with its weights."""
    weights = []
    for state in checkpoint.state_dicts:
        keys = [k for k in state if k.startswith("head.") and k.endswith(".weight")]
        weights.append(np.asarray(state[max(keys, key=lambda k: int(k.split(".")[1]))].float())[0])
    return weights


class OnnxNetwork:
    def __init__(self, graph: bytes, head_weights: list[np.ndarray], threads: int = 1):
        runtime = onnxruntime()
        options = runtime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = runtime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.head_weights = [np.asarray(w, np.float32) for w in head_weights]

    @classmethod
    def for_checkpoint(cls, checkpoint, graph: bytes, threads: int = 1) -> OnnxNetwork:
        return cls(graph, head_weights(checkpoint), threads)

    def run(self, inputs: np.ndarray, batch_size: int = 512) -> tuple[NetworkOutput, list[np.ndarray]]:
        """Preprocessed (N, S, S) -> the raw outputs and each member's last-block activations."""
        parts, activations = [], []
        for start in range(0, len(inputs), batch_size):
            films = np.ascontiguousarray(inputs[start:start + batch_size], dtype=np.float32)[:, None]
            logits, aligned, features, theta, taps, *members = self.session.run(None, {"films": films})
            parts.append(NetworkOutput(logits.astype(np.float64), aligned[:, 0], features, theta, taps))
            activations.append(members)
        output = NetworkOutput(*(np.concatenate(column) for column in zip(*parts)))
        return output, [np.concatenate(member) for member in zip(*activations)]

    def grad_cam(self, activations: list[np.ndarray], size: int) -> np.ndarray:
        """``model.saliency.grad_cam`` in numpy: (N, size, size) in [0, 1]."""
        cams = 0
        for weight, activation in zip(self.head_weights, activations):
            height, width = activation.shape[-2:]
            per_channel = weight / (height * width) / len(self.head_weights)
            cams = cams + np.maximum(np.einsum("nchw,c->nhw", activation, per_channel), 0)
        cams = np.stack([cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR) for cam in cams])
        peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
        return (cams / np.maximum(peak, 1e-8)).astype(np.float32)
