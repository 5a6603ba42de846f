import os

import numpy as np
import pytest
import torch

from harness.images import synthetic_xray
from model import (
    Checkpoint,
    CheckpointError,
    NetworkConfig,
    PneumoniaNet,
    Predictor,
    PreprocessParams,
    load_checkpoint,
    save_checkpoint,
)


def make_checkpoint(preprocess=PreprocessParams(), threshold=0.3) -> Checkpoint:
    torch.manual_seed(0)
    net = PneumoniaNet(NetworkConfig())
    return Checkpoint(
        network=net.config,
        preprocess=preprocess,
        state_dicts=[net.state_dict()],
        threshold=threshold,
        version="test-1",
        created_at="2026-01-01T00:00:00+00:00",
        metrics={"test": {"auc": 0.5}},
    )


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    original = make_checkpoint()
    path = save_checkpoint(original, tmp_path / "ck.pt")
    loaded = load_checkpoint(path, expected_preprocess=PreprocessParams())
    assert loaded.version == "test-1" and loaded.threshold == 0.3
    assert loaded.metrics == {"test": {"auc": 0.5}}
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(loaded.model(x), original.model(x))


def test_missing_truncated_and_foreign_files_raise_one_error_type(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(make_checkpoint(), tmp_path / "ck.pt")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(foreign)


def test_incompatible_preprocessing_is_refused(tmp_path):
    path = save_checkpoint(make_checkpoint(PreprocessParams(geometry="center_crop")), tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="preprocessing"):
        load_checkpoint(path, expected_preprocess=PreprocessParams(geometry="squash"))
    with pytest.raises(CheckpointError, match="preprocessing"):
        Predictor.from_path(path)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    checkpoint = make_checkpoint()
    checkpoint.network = NetworkConfig(channels=(8, 8, 8, 8))
    path = save_checkpoint(checkpoint, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint(make_checkpoint(threshold=0.3), tmp_path / "ck.pt")
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the admin pressed Ctrl-C mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_checkpoint(threshold=0.7), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temp file left behind


def test_predictor_applies_the_threshold(tmp_path):
    path = save_checkpoint(make_checkpoint(threshold=0.5), tmp_path / "ck.pt")
    predictor = Predictor.from_path(path)
    prediction = predictor.predict(synthetic_xray(300, 260))
    assert 0.0 <= prediction.probability <= 1.0
    assert prediction.label == ("PNEUMONIA" if prediction.probability >= 0.5 else "NORMAL")
    assert prediction.model_input.shape == prediction.aligned.shape == (64, 64)
    assert np.isclose(prediction.aligned.min(), 0) and np.isclose(prediction.aligned.max(), 1)
