"""What a probability means: calibrated to the validation mix, and shown for the clinic's
expected prevalence when one is set, with the decision left at the validated threshold."""
import re
import subprocess
import sys

import pytest

from app.config import ConfigError, clinic_prevalence
from model import prior_shift
from model.settings import REPO_ROOT
from tests.client import Uploads, network_probability


def test_the_prior_shift_keeps_the_likelihood_ratio():
    assert prior_shift(0.3, 0.74, 0.74) == pytest.approx(0.3)
    assert prior_shift(0.5, 0.74, 0.2) == pytest.approx(0.0808, abs=1e-4)  # odds 1 x (0.25 / 2.846)
    assert prior_shift(prior_shift(0.9, 0.74, 0.1), 0.1, 0.74) == pytest.approx(0.9)
    assert prior_shift(1.0, 0.74, 0.1) == 1.0 and prior_shift(0.0, 0.74, 0.1) == 0.0


def test_pages_and_api_show_the_clinics_probability_and_keep_the_decision(make_app, app, pediatric_film):
    film = pediatric_film
    plain = Uploads(app.test_client())
    clinic = Uploads(make_app(CLINIC_PREVALENCE=0.2).test_client())
    before, after = plain.api(film).get_json(), clinic.api(film).get_json()
    calibration = before["calibration_prevalence"]
    assert "probability_at_clinic_prevalence" not in before and after["clinic_prevalence"] == 0.2
    assert network_probability(after) == network_probability(before) and after["label"] == before["label"]
    expected = prior_shift(network_probability(before), calibration, 0.2)
    assert after["probability_at_clinic_prevalence"] == pytest.approx(expected, abs=1e-4)  # from a rounded p
    page = clinic.form(film).get_data(as_text=True)
    shown = float(re.search(r'id="probability">([\d.]+)%', page).group(1))
    assert shown == pytest.approx(100 * expected, abs=0.05) and "this clinic's expected share" in page
    assert re.search(r'id="probability">([\d.]+)%', plain.form(film).get_data(as_text=True)).group(1) == (
        f"{100 * before['probability']:.1f}")
    batch = clinic.batch_form([(film, "a.jpeg")]).get_data(as_text=True)
    assert f"{100 * expected:.1f}%" in batch and 'id="prevalence-note"' in batch
    card = clinic.client.get("/model").get_data(as_text=True)
    assert "Expects\n    20% of its films" in card and "Decisions stay at the validated threshold" in card


def test_a_bad_prevalence_setting_stops_start_up_with_one_line(monkeypatch, model_store):
    monkeypatch.setenv("CLINIC_PREVALENCE", "20")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        clinic_prevalence()
    result = subprocess.run([sys.executable, "-c", "import wsgi"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={"CLINIC_PREVALENCE": "lots", "PATH": "/usr/bin:/bin",
                                 "PNEUMONIA_MODEL_STORE": str(model_store)}, timeout=120)
    assert result.returncode == 3 and "cannot start: CLINIC_PREVALENCE" in result.stderr
    assert "Traceback" not in result.stderr
