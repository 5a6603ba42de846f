"""The out-of-population gate of the bundled model: non-X-rays flagged, the test split passed."""
import numpy as np
import pytest

from harness.images import encode
from harness.non_xray import non_xray_images


@pytest.fixture(scope="module")
def predictor(app):
    return app.extensions["model"].predictor


def test_bundled_checkpoint_has_a_gate_and_calibration(predictor):
    checkpoint = predictor.checkpoint
    assert checkpoint.gate is not None and checkpoint.gate.rule
    assert checkpoint.calibration["temperature"] > 0
    assert "ece" in checkpoint.metrics["test"]["calibration"]


def test_every_non_xray_image_is_flagged(predictor):
    missed = []
    for name, image in non_xray_images():
        prediction = predictor.predict(image)
        if prediction.in_distribution:
            missed.append((name, round(prediction.ood_score, 3)))
    assert missed == []


def test_gate_passes_the_test_split(predictor, real_data):
    from training.data import load_split

    split = load_split(real_data, "test", predictor.checkpoint.preprocess, cache_dir=None, progress=False)
    flagged = float(np.mean(predictor.predict_many(split.images).ood_scores > 1))
    assert flagged <= 0.05
    assert flagged == pytest.approx(predictor.checkpoint.metrics["test"]["ood_flagged"], abs=1e-9)


def test_a_photo_gets_a_reason_and_no_label_in_the_api_and_no_decision_on_the_page(uploads):
    photo = encode(np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8), ".png")
    body = uploads.api(photo).get_json()
    assert body["in_distribution"] is False and body["research"]["ood_score"] > 1 and body["label"] is None
    assert [r["check"] for r in body["population_reasons"]] == ["image"]
    assert "not an X-ray" in body["population_reasons"][0]["message"]
    html = uploads.form(photo).get_data(as_text=True)
    assert 'id="ood-warning"' in html and "not an X-ray" in html
    assert 'id="decision"' not in html and "PNEUMONIA suspected" not in html and 'id="no-probability"' in html
    assert f"{100 * body['research']['probability']:.1f}%" not in html  # no number that reads as an answer


def test_the_gate_distances_are_the_textbook_ones():
    """Mahalanobis distance to the nearer class mean; RMS of the PCA reconstruction's residual."""
    from model.gate import OODGate

    rng = np.random.default_rng(0)
    features, inputs = rng.normal(size=(5, 6)), rng.random((5, 4, 4))
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T  # (3, 16), orthonormal rows, as PCA gives
    root = rng.normal(size=(6, 6))
    gate = OODGate(class_means=rng.normal(size=(2, 6)), precision=root @ root.T, pixel_mean=rng.random(16),
                   pixel_components=basis, feature_scale=1.0, pixel_scale=1.0)
    expected = np.sqrt(np.min([[d @ gate.precision @ d for d in features - mean] for mean in gate.class_means], axis=0))
    np.testing.assert_allclose(gate.feature_distance(features), expected, rtol=1e-9)
    flat = inputs.reshape(5, -1) - gate.pixel_mean
    residual = flat - flat @ basis.T @ basis
    np.testing.assert_allclose(gate.pixel_error(inputs), np.sqrt((residual**2).mean(axis=1)), rtol=1e-9)
