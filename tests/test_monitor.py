"""Drift and agreement: the stability index, the intervals, and the alerts on real films:
a few hundred cases of processed or out-of-population films raise them, the test split's
own films do not."""
import numpy as np
import pytest

from app.cases import Answer, CaseRecord
from app.monitor import PSI_ALERT, figures, psi
from model.validation import wilson
from training.film_changes import clahe
from training.site_shift import read_film


def test_the_stability_index_is_zero_for_the_same_mix_and_large_for_another():
    rng = np.random.default_rng(0)
    reference = rng.beta(0.6, 0.4, 5000)
    assert psi(reference, rng.beta(0.6, 0.4, 5000)) < 0.02
    assert psi(reference, rng.beta(0.4, 0.6, 5000)) > PSI_ALERT


def test_wilson_intervals():
    assert wilson(0, 0) is None
    low, high = wilson(45, 50)
    assert low == pytest.approx(0.786, abs=0.002) and high == pytest.approx(0.957, abs=0.002)


@pytest.fixture(scope="module")
def predictor(app):
    return app.extensions["model"].predictor


@pytest.fixture(scope="module")
def sample(real_data) -> list:
    """300 test-split films drawn at random, in the split's own mix."""
    files = sorted((real_data / "test").glob("*/*.jpeg"))
    chosen = np.random.default_rng(32).choice(len(files), 300, replace=False)
    return [read_film(files[i]) for i in sorted(chosen)]


def monitored(app, tmp_path, predictor, films, name: str) -> dict:
    record = CaseRecord(f"sqlite:///{tmp_path / name}.sqlite3")
    record.migrate()
    for film in films:
        record.record(b"\xff\xd8", Answer.of(predictor.predict(film)), predictor.version, "api", None, None)
    with app.app_context():  # the test split's probabilities come from the serving version's map
        return figures(record.engine, predictor.version, predictor.checkpoint)


def test_the_test_splits_own_films_raise_no_alert(app, tmp_path, predictor, sample):
    found = monitored(app, tmp_path, predictor, sample, "test-split")
    assert found["alerts"] == [] and found["stability"]["value"] < PSI_ALERT
    assert found["refusal"]["n"] == 200 and found["refusal"]["value"] < 2 * found["refusal"]["test_split"] + 0.02


def test_films_under_local_contrast_processing_raise_the_refusal_alert(app, tmp_path, predictor, sample):
    found = monitored(app, tmp_path, predictor, [clahe(film, 16.0, 8) for film in sample], "clahe")
    assert found["refusal"]["value"] >= 2 * found["refusal"]["test_split"]
    assert any("refused as outside the intended use" in alert for alert in found["alerts"])


def test_another_case_mix_raises_the_drift_alert(app, tmp_path, predictor, real_data):
    """A ward that sends almost only normal films: the probabilities no longer look like the
    test split's, though each film is in population."""
    films = [read_film(path) for path in sorted((real_data / "test" / "NORMAL").iterdir())[:230]]
    found = monitored(app, tmp_path, predictor, films, "normal-ward")
    assert found["stability"]["value"] > PSI_ALERT
    assert any("drifted" in alert for alert in found["alerts"])


def test_adults_films_raise_the_refusal_alert(app, tmp_path, predictor, real_adult_data):
    films = [read_film(path) for path in sorted((real_adult_data / "frontal").iterdir())[:200]]
    found = monitored(app, tmp_path, predictor, films, "adults")
    assert found["refusal"]["value"] > 0.5 and "image" in found["refusal"]["why"]
    assert any("refused as outside the intended use" in alert for alert in found["alerts"])


def test_agreement_below_the_model_cards_interval_raises_its_alert(app, tmp_path, predictor):
    record = CaseRecord(f"sqlite:///{tmp_path / 'reads.sqlite3'}")
    record.migrate()
    missed = Answer(0.1, 0.5, "NORMAL", None, 0.1, None)
    found_ = Answer(0.9, 0.5, "PNEUMONIA", None, 0.1, None)
    for answer in [found_] * 30 + [missed] * 10:  # the clinicians read pneumonia on all 40: sensitivity 75%
        case_id = record.record(b"\xff\xd8", answer, predictor.version, "page", None, None)
        record.add_overread(case_id, "pneumonia", None, None)
    with app.app_context():
        result = figures(record.engine, predictor.version, predictor.checkpoint)
    sensitivity = result["agreement"]["sensitivity"]
    assert sensitivity["value"] == 0.75 and sensitivity["n"] == 40
    assert any("sensitivity against the clinicians' overreads" in alert for alert in result["alerts"])


def test_the_overread_cases_get_the_site_report_refused_films_counted_uncertain_left_out(app, tmp_path, predictor):
    record = CaseRecord(f"sqlite:///{tmp_path / 'site.sqlite3'}")
    record.migrate()
    caught = Answer(0.9, 0.5, "PNEUMONIA", None, 0.1, None)
    alarm = Answer(0.8, 0.5, "PNEUMONIA", None, 0.1, None)
    cleared = Answer(0.1, 0.5, "NORMAL", None, 0.1, None)
    refused = Answer(0.7, 0.5, None, "image", 2.0, None)
    for answer, read in [(caught, "pneumonia")] * 3 + [(alarm, "normal"), (cleared, "normal"), (cleared, "normal"),
                                                      (refused, "pneumonia"), (caught, "uncertain")]:
        case_id = record.record(b"\xff\xd8", answer, predictor.version, "page", None, None)
        record.add_overread(case_id, read, None, None)
    with app.app_context():
        report = figures(record.engine, predictor.version, predictor.checkpoint)["site_report"]
    assert (report["films"], report["pneumonia"], report["normal"], report["uncertain"]) == (7, 4, 3, 1)
    assert report["refused"]["successes"] == 1 and report["refused"]["why"] == {"image": 1}
    assert report["sensitivity"]["value"] == 1.0 and report["sensitivity"]["n"] == 3
    assert report["false_positive_rate"]["successes"] == 1 and report["false_positive_rate"]["n"] == 3
    assert not report["trust"]["enough"] and report["trust"]["missing"] == {"pneumonia": 97, "normal": 97}


def test_a_site_adapted_version_is_compared_with_its_own_site_not_the_test_split(app, tmp_path, predictor):
    import dataclasses

    from model.validation import local_validation

    held = local_validation(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.6]), 0.5)
    checkpoint = dataclasses.replace(predictor.checkpoint, metrics={
        **predictor.checkpoint.metrics, "site": {"name": "North", "held_out": held, "reference": [0.9, 0.8, 0.2, 0.6]}})
    record = CaseRecord(f"sqlite:///{tmp_path / 'north.sqlite3'}")
    record.migrate()
    with app.app_context():
        found = figures(record.engine, predictor.version, checkpoint)
    assert found["reference_name"] == "site North's held-out films"
    assert found["stability"]["reference"] == 4 and found["refusal"]["test_split"] == 0.0
    assert found["agreement"]["specificity"]["model_card"] == 0.5


def monitor_page(make_app, tmp_path, answers_and_reads, name: str) -> tuple[dict, str]:
    """The /monitor page and its JSON over a record holding ``answers_and_reads`` (answer, read or None)."""
    app = make_app(DATABASE_URL=f"sqlite:///{tmp_path / name}.sqlite3")
    record, version = app.extensions["cases"], app.extensions["model"].predictor.version
    for answer, read in answers_and_reads:
        case_id = record.record(b"\xff\xd8", answer, version, "page", None, None)
        if read:
            record.add_overread(case_id, read, None, None)
    client = app.test_client()
    return client.get("/api/v1/monitor").get_json(), client.get("/monitor").get_data(as_text=True)


CAUGHT = Answer(0.9, 0.5, "PNEUMONIA", None, 0.1, None)
MISSED = Answer(0.1, 0.5, "NORMAL", None, 0.1, None)
REFUSED = Answer(0.99, 0.5, None, "image", 2.0, None)


def test_thirty_cases_that_contradict_the_card_raise_alerts_and_never_say_no_alert(make_app, tmp_path):
    """The ward's round: 13 of 30 refused (43%, 95% 27-61%) against the card's 1.4%, and the clinicians
    reading pneumonia on three answered films of which the model caught two (67%, 21-94%)."""
    cases = [(REFUSED, None)] * 13 + [(CAUGHT, "pneumonia")] * 2 + [(MISSED, "pneumonia")] + [(MISSED, None)] * 14
    found, page = monitor_page(make_app, tmp_path, cases, "round")
    assert found["refusal"]["value"] == pytest.approx(13 / 30)
    assert any("refused as outside the intended use" in alert for alert in found["alerts"])
    assert any(a.startswith("The sensitivity against the clinicians' overreads, 66.7%") for a in found["alerts"])
    assert "No alert" not in page and 'id="alerts"' in page
    assert any(need.startswith("refusals: 30 of the 200") for need in found["waiting"])


def test_a_few_quiet_cases_say_not_enough_to_judge_with_what_each_check_needs(make_app, tmp_path):
    found, page = monitor_page(make_app, tmp_path, [(MISSED, "normal")] * 10, "quiet")
    assert found["alerts"] == []
    assert "No alert" not in page and "Not enough cases to judge yet" in page
    assert "specificity: 10 of 30 answered films read normal" in found["waiting"]
    assert "sensitivity: 0 of 30 answered films read pneumonia" in found["waiting"]
