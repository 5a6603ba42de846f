"""Temperature scaling: it undoes a known miscalibration, and the model card shows how well it holds."""
import numpy as np
import pytest

from model import calibrate
from training.calibrate import fit_temperature, reliability


def test_temperature_scaling_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-true_logits))
    overconfident = 3 * true_logits - 1  # temperature 1/3 and a shift
    fitted = fit_temperature(overconfident, labels)
    assert fitted["temperature"] == pytest.approx(3, rel=0.1) and fitted["bias"] == pytest.approx(1 / 3, abs=0.1)
    assert reliability(labels, calibrate(overconfident, fitted))["ece"] < 0.02
    assert reliability(labels, 1 / (1 + np.exp(-overconfident)))["ece"] > 0.05


def test_model_card_shows_reliability_diagrams_and_ece(client):
    html = client.get("/model").get_data(as_text=True)
    assert html.count("Reliability diagram") == 2 and "ECE" in html and "Out-of-population gate" in html
