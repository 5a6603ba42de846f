"""The committed checkpoint, on the real original-size test split, at its committed threshold."""
import numpy as np
import pytest

from model import Predictor, PreprocessParams
from model.settings import DEFAULT_CHECKPOINT
from training.data import load_split
from training.metrics import binary_metrics


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_path(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def test_split(real_data, predictor):
    return load_split(real_data, "test", predictor.checkpoint.preprocess, cache_dir=None, workers=2, progress=False)


def test_bundled_checkpoint_uses_this_code_s_preprocessing(predictor):
    assert predictor.checkpoint.preprocess == PreprocessParams()
    assert DEFAULT_CHECKPOINT.stat().st_size < 20 * 1024 * 1024


def test_threshold_was_chosen_on_validation(predictor):
    checkpoint = predictor.checkpoint
    assert checkpoint.metrics["validation"]["threshold"] == pytest.approx(checkpoint.threshold)
    assert checkpoint.metrics["validation"]["sensitivity"] >= 0.98
    assert "validation" in checkpoint.threshold_rule and "never on test" in checkpoint.threshold_rule


def test_must_figures_on_the_original_size_test_split(predictor, test_split):
    assert len(test_split) == 624
    probabilities = predictor.predict_many(test_split.images).probabilities
    metrics = binary_metrics(test_split.labels, probabilities, predictor.threshold)
    assert metrics["auc"] >= 0.96
    assert metrics["sensitivity"] >= 0.98
    assert metrics["false_positive_rate"] <= 0.35
    # the recipe's goals, met by the shipped seed (docs/model.md gives all three seeds)
    assert metrics["auc"] >= 0.98 and metrics["false_positive_rate"] <= 0.25
    # the figures written into the checkpoint (and docs/model.md) are the ones we measure now
    stored = predictor.checkpoint.metrics["test"]
    assert metrics["confusion"] == stored["confusion"]
    assert metrics["auc"] == pytest.approx(stored["auc"], abs=1e-6)


def test_predictor_on_bytes_matches_the_batch_path(predictor, real_data, test_split):
    path = real_data / test_split.files[0]
    single = predictor.predict(path.read_bytes()).probability
    batch = predictor.predict_many(test_split.images[:1]).probabilities
    assert single == pytest.approx(float(batch[0]), abs=1e-5)
    np.testing.assert_array_equal(predictor.preprocess(path.read_bytes()), test_split.images[0])
