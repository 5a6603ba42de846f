"""A model version's network as one ONNX graph, checked against its checkpoint before it is kept.

    python -m training.onnx_export [--version VERSION] [--store DIR]   # default: the serving version

The checkpoint stays the source of truth; the graph is what a serving process without
PyTorch would run (issue 46). One graph, a dynamic batch, every output the app uses: the
logit, the aligned 64 x 64 film, the transform, the penultimate features, the population
head's taps and the last block's activations (Grad-CAM). It is written next to the version
in the store (``versions/<version>.onnx``) only when ONNX Runtime, run on a fixed set of
films, reproduces the checkpoint's outputs (``TOLERANCES``); otherwise it is refused with
the largest difference, and nothing is written but the reason, in the version's summary.
The checkpoint less its weights rides in the graph's metadata (``model.serving_file``), so
a serving process needs that file alone. ``add_to_store`` is how training adds a version.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from model import Checkpoint, Ensemble, NetworkOutput, PneumoniaNet
from model.atomic import atomic_write
from model.onnx_network import head_weights, onnxruntime
from model.serving_file import METADATA_KEY, check_films, graph_beside, metadata, relative_difference
from model.settings import DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, model_store_dir
from model.store import ModelStore

log = logging.getLogger("training")

OUTPUTS = ("logits", "aligned", "features", "theta", "taps")
#: The most an output may differ from the checkpoint's (float32 arithmetic in another order), over the
#: output's scale where it exceeds 1 (``model.serving_file.relative_difference``).
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


@contextlib.contextmanager
def _quiet(*names: str):
    """The exporter's optimiser logs every pass at INFO: warnings and errors only, while it runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
    with warnings.catch_warnings(), torch.no_grad(), _quiet("onnxscript", "torch.onnx", "torch.export"):
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


def differences(checkpoint: Checkpoint, graph: bytes, films: np.ndarray) -> dict[str, float]:
    """The largest absolute difference of each output between the graph (ONNX Runtime) and the checkpoint,
    over that output's scale where it exceeds 1 (float32 arithmetic in another order errs in proportion)."""
    session = onnxruntime().InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = dict(zip(output_names(checkpoint), session.run(None, {"films": films[:, None]})))
    with torch.inference_mode():  # one pass: the outputs as infer_batches gives them, and the activations
        out = checkpoint.model.infer(torch.from_numpy(films[:, None]))
    expected, activations = NetworkOutput.of(out), [a.float().numpy() for a in out.activations]
    pairs = {"logits": (got["logits"], expected.logits), "aligned": (got["aligned"][:, 0], expected.aligned),
             "features": (got["features"], expected.features), "theta": (got["theta"], expected.theta),
             "taps": (got["taps"], expected.taps)}
    found = {name: relative_difference(a, b) for name, (a, b) in pairs.items()}
    found["activations"] = max((relative_difference(got[f"activations{i}"], a) for i, a in enumerate(activations)),
                               default=0.0)
    return found


def export_checked(checkpoint: Checkpoint, films: np.ndarray | None = None) -> tuple[bytes, dict[str, float]]:
    """The graph and its differences from the checkpoint; ``ExportError`` when one is over its tolerance."""
    if checkpoint.population_gate is not None and checkpoint.population_gate.kind != "head":
        raise ExportError("its population gate is networks of its own, which only PyTorch runs: refit the gate "
                          "(python -m training.population)")
    graph = export_bytes(checkpoint)
    found = differences(checkpoint, graph, check_films(checkpoint.preprocess.size) if films is None else films)
    over = {name: value for name, value in found.items() if not value <= TOLERANCES[name]}
    if over:
        worst = max(over, key=lambda name: over[name] / TOLERANCES[name])
        raise ExportError(f"the graph does not reproduce the checkpoint: {worst} differs by {over[worst]:.2g} "
                          f"(at most {TOLERANCES[worst]:g})")
    return graph, found


def serving_file(checkpoint: Checkpoint) -> tuple[bytes, dict[str, float]]:
    """The version's serving file (``model.serving_file``): the checked graph, with the checkpoint less its
    weights and the checkpoint's logits on ``check_films`` in its metadata."""
    import onnx

    graph, found = export_checked(checkpoint)
    films = check_films(checkpoint.preprocess.size)
    with torch.inference_mode():
        logits = checkpoint.model.infer(torch.from_numpy(films[:, None])).logits.double().numpy()
    proto = onnx.load_from_string(graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata(checkpoint, head_weights(checkpoint), logits)
    return proto.SerializeToString(), found


def add_to_store(store: ModelStore, checkpoint: Checkpoint, source: str = "training") -> Path:
    """``ModelStore.add`` with the version's serving file; one the export refuses is recorded with its reason
    (``training.store list`` shows it), and the version then serves only where PyTorch is installed."""
    try:
        graph, _ = serving_file(checkpoint)
    except ExportError as exc:
        log.warning("version %s gets no ONNX serving file: %s", checkpoint.version, exc)
        return store.add(checkpoint, source, graph_refused=str(exc))
    return store.add(checkpoint, source, graph=graph)


def save_beside(checkpoint: Checkpoint, path: Path) -> Path | None:
    """A checkpoint file's serving file, written beside it (``model.serving_file.graph_beside``); where the
    export refuses, a stale one there is removed, so that no server runs another version's graph."""
    beside = graph_beside(path)
    try:
        graph, _ = serving_file(checkpoint)
    except ExportError as exc:
        log.warning("%s gets no ONNX serving file: %s", path.name, exc)
        beside.unlink(missing_ok=True)
        return None
    with atomic_write(beside) as handle:
        handle.write(graph)
    return beside


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
        graph, found = serving_file(checkpoint)
    except ExportError as exc:
        store.record_graph(version, refused=str(exc))
        print(f"{version}: no ONNX graph: {exc}", file=sys.stderr)
        return 1
    path = store.record_graph(version, graph=graph)
    print(f"{version}: {path} ({len(graph) / 1024:.0f} KB); largest differences from the checkpoint: "
          + ", ".join(f"{name} {value:.1e}" for name, value in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
