"""The ONNX graph of a version: made, checked against its checkpoint, refused when it differs,
and the same answers through the predictor."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model import Predictor, load_checkpoint
from model.onnx_network import OnnxNetwork
from model.settings import DEFAULT_CHECKPOINT
from training import onnx_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    return load_checkpoint(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def graph(bundled) -> bytes:
    graph, found = onnx_export.export_checked(bundled)
    assert all(found[name] <= onnx_export.TOLERANCES[name] for name in found)
    return graph


def test_the_graph_gives_the_checkpoint_s_answers_and_heat_maps(bundled, graph, real_data):
    eager = Predictor(bundled)
    onnx = Predictor(bundled, network=OnnxNetwork.for_checkpoint(bundled, graph))
    test = real_data / "test"
    films = sorted((test / "PNEUMONIA").iterdir())[:3] + sorted((test / "NORMAL").iterdir())[:3]
    for path in films:
        a, b = eager.predict(path.read_bytes(), saliency=True), onnx.predict(path.read_bytes(), saliency=True)
        assert (a.label, a.in_distribution) == (b.label, b.in_distribution)
        assert b.probability == pytest.approx(a.probability, abs=1e-4)
        assert np.abs(a.saliency - b.saliency).max() <= 1e-3
    inputs = np.stack([eager.preprocess(path.read_bytes()) for path in films])
    batch_a, batch_b = eager.predict_many(inputs), onnx.predict_many(inputs)
    assert np.abs(batch_a.probabilities - batch_b.probabilities).max() <= 1e-4
    assert np.array_equal(batch_a.ood_scores > 1, batch_b.ood_scores > 1)


def test_a_graph_that_does_not_reproduce_its_checkpoint_is_refused(bundled, graph, monkeypatch):
    states = [{name: value.clone() for name, value in state.items()} for state in bundled.state_dicts]
    head = max((k for k in states[0] if k.startswith("head.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    states[0][head] += 0.05 * torch.randn_like(states[0][head])
    other = dataclasses.replace(bundled, state_dicts=states)
    monkeypatch.setattr(onnx_export, "export_bytes", lambda checkpoint: graph)  # the bundled graph, another checkpoint
    with pytest.raises(onnx_export.ExportError, match="does not reproduce the checkpoint: (logits|features)"):
        onnx_export.export_checked(other)


def test_the_command_writes_the_graph_beside_the_version(tmp_path, capsys):
    assert onnx_export.main(["--store", str(tmp_path)]) == 0
    written = list((tmp_path / "versions").glob("*.onnx"))
    assert len(written) == 1 and written[0].stem == load_checkpoint(DEFAULT_CHECKPOINT).version
    assert "largest differences from the checkpoint" in capsys.readouterr().out
