"""A model version's network as one ONNX graph, checked against its checkpoint before it is kept.

    python -m training.onnx_export [--version VERSION] [--store DIR]   # default: the serving version

The checkpoint stays the source of truth; the graph is what a serving process without
PyTorch would run (issue 46). One graph, a dynamic batch, every output the app uses: the
logit, the aligned 64 x 64 film, the transform, the penultimate features, the population
head's taps and the last block's activations (Grad-CAM). It is written next to the version
in the store (``versions/<version>.onnx``) only when ONNX Runtime, run on a fixed set of
films, reproduces the checkpoint's outputs (``TOLERANCES``); otherwise it is refused with
the largest difference, and nothing is written.
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from model import Checkpoint, Ensemble, NetworkOutput, PneumoniaNet
from model.atomic import atomic_write
from model.settings import DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, model_store_dir
from model.store import ModelStore

log = logging.getLogger("training")

OUTPUTS = ("logits", "aligned", "features", "theta", "taps")
#: The most an output may differ from the checkpoint's (float32 arithmetic in another order).
TOLERANCES = {"logits": 1e-4, "aligned": 1e-4, "features": 1e-4, "theta": 1e-5, "taps": 1e-4, "activations": 1e-4}
OPSET = 20  # affine_grid (the spatial transformer) needs 20


class ExportError(RuntimeError):
    """The graph could not be made, or does not reproduce its checkpoint."""


class _Outputs(torch.nn.Module):
    """``Ensemble.infer`` as a tuple, the form an exporter takes."""

    def __init__(self, model: Ensemble):
        super().__init__()
        self.model = model

    def forward(self, films: torch.Tensor):
        out = self.model.infer(films)
        return (out.logits, out.aligned, out.features, out.theta, out.taps, *out.activations)


def plain_model(checkpoint: Checkpoint) -> Ensemble:
    """The network as trained (not ``for_inference``'s fused copy, whose oneDNN calls no exporter knows)."""
    members = []
    for state in checkpoint.state_dicts:
        member = PneumoniaNet(checkpoint.network)
        member.load_state_dict(state)
        members.append(member)
    return Ensemble(members).eval()


def output_names(checkpoint: Checkpoint) -> list[str]:
    return [*OUTPUTS, *(f"activations{i}" for i in range(len(checkpoint.state_dicts)))]


def export_bytes(checkpoint: Checkpoint) -> bytes:
    side = checkpoint.preprocess.size
    example = torch.rand(2, 1, side, side)
    batch = torch.export.Dim("films", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(_Outputs(plain_model(checkpoint)), (example,), input_names=["films"],
                                        output_names=output_names(checkpoint), dynamic_shapes=({0: batch},),
                                        dynamo=True, opset_version=OPSET, verbose=False)
        except Exception as exc:  # noqa: BLE001 - whatever the exporter raises is this version's refusal
            raise ExportError(f"the exporter failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def check_films(side: int, count: int = 32, seed: int = 46) -> np.ndarray:
    """A fixed set of inputs: smooth film-like fields and noise, in [0, 1] as preprocessing gives."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    smooth = [np.clip(0.5 + 0.4 * np.sin(rng.uniform(1, 6) * x + rng.uniform(0, 3)) * np.cos(rng.uniform(1, 6) * y),
                      0, 1) for _ in range(count // 2)]
    noise = list(rng.random((count - count // 2, side, side)))
    return np.stack(smooth + noise).astype(np.float32)


def differences(checkpoint: Checkpoint, graph: bytes, films: np.ndarray) -> dict[str, float]:
    """The largest absolute difference of each output between the graph (ONNX Runtime) and the checkpoint."""
    import onnxruntime

    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = dict(zip(output_names(checkpoint), session.run(None, {"films": films[:, None]})))
    with torch.inference_mode():  # one pass: the outputs as infer_batches gives them, and the activations
        out = checkpoint.model.infer(torch.from_numpy(films[:, None]))
    expected, activations = NetworkOutput.of(out), [a.float().numpy() for a in out.activations]
    found = {"logits": got["logits"] - expected.logits, "aligned": got["aligned"][:, 0] - expected.aligned,
             "features": got["features"] - expected.features, "theta": got["theta"] - expected.theta,
             "taps": got["taps"] - expected.taps,
             "activations": max((np.abs(got[f"activations{i}"] - a).max() for i, a in enumerate(activations)),
                                default=0.0)}
    return {name: float(np.abs(value).max()) for name, value in found.items()}


def export_checked(checkpoint: Checkpoint, films: np.ndarray | None = None) -> tuple[bytes, dict[str, float]]:
    """The graph and its differences from the checkpoint; ``ExportError`` when one is over its tolerance."""
    graph = export_bytes(checkpoint)
    found = differences(checkpoint, graph, check_films(checkpoint.preprocess.size) if films is None else films)
    over = {name: value for name, value in found.items() if not value <= TOLERANCES[name]}
    if over:
        worst = max(over, key=lambda name: over[name] / TOLERANCES[name])
        raise ExportError(f"the graph does not reproduce the checkpoint: {worst} differs by {over[worst]:.2g} "
                          f"(at most {TOLERANCES[worst]:g})")
    return graph, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=model_store_dir())
    parser.add_argument("--version", default=None, help="default: the serving version")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    store = ModelStore(args.store)
    store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT)
    version = args.version or store.serving_version()
    checkpoint = store.load(version)
    try:
        graph, found = export_checked(checkpoint)
    except ExportError as exc:
        print(f"{version}: no ONNX graph: {exc}", file=sys.stderr)
        return 1
    path = store.checkpoint_path(version).with_suffix(".onnx")
    with atomic_write(path) as handle:
        handle.write(graph)
    print(f"{version}: {path} ({len(graph) / 1024:.0f} KB); largest differences from the checkpoint: "
          + ", ".join(f"{name} {value:.1e}" for name, value in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
