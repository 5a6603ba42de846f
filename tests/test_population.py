"""The intended use, enforced: DICOM header, the age a person gives, and the pixels."""
import dataclasses

import numpy as np
import pytest
import torch

from harness.dicom_files import make_dicom, twelve_bit
from harness.images import encode, synthetic_xray
from model import CheckpointError, load_checkpoint, save_checkpoint
from model.card import ADULT_HELD_OUT
from model.film_facts import FilmFacts, age_from_dates, parse_dicom_age
from model.intended_use import IntendedUse, metadata_reasons
from model.population import KINDS, PopulationHead
from model.population_nets import PopulationGate, PopulationNet
from model.settings import DEFAULT_CHECKPOINT
from tests.client import Uploads, network_probability

USE = IntendedUse()


# ---- the rules, on their own ---------------------------------------------------------


@pytest.mark.parametrize("value, years", [("005Y", 5), ("018M", 1.5), ("010W", 70 / 365.25), ("003D", 3 / 365.25),
                                          ("045Y", 45), ("", None), ("5 years", None), ("Y", None), (None, None)])
def test_dicom_ages(value, years):
    parsed = parse_dicom_age(value)
    assert parsed == pytest.approx(years, abs=1e-3) if years is not None else parsed is None


def test_age_from_birth_date_and_the_first_readable_study_date():
    assert age_from_dates("20200115", "", "garbage", "20230115") == pytest.approx(3.0, abs=0.01)
    assert age_from_dates("20200115", None) is None
    assert age_from_dates("not a date", "20230115") is None
    assert age_from_dates("20230115", "20200115") is None  # taken before birth: says nothing


@pytest.mark.parametrize("facts, age, checks", [
    (FilmFacts(), None, []),
    (FilmFacts(age_years=3), None, []),
    (FilmFacts(age_years=45), None, ["age"]),
    (FilmFacts(), 45, ["age"]),
    (FilmFacts(), 5.9, []),
    (FilmFacts(), 6, ["age"]),
    (FilmFacts(view="LL"), None, ["view"]),
    (FilmFacts(view="PA", body_part="CHEST"), None, []),
    (FilmFacts(body_part="HAND"), None, ["body_part"]),
    (FilmFacts(age_years=40, view="RL", body_part="KNEE"), None, ["age", "view", "body_part"]),
])
def test_metadata_rules(facts, age, checks):
    assert [r.check for r in metadata_reasons(facts, age, USE)] == checks


# ---- through the app: DICOM tags -----------------------------------------------------


@pytest.fixture(scope="module")
def child_pixels(real_data):
    """Pixels of a real in-population film, to put in generated DICOM files (the image layer passes them)."""
    import cv2

    from model import Predictor

    predictor = Predictor.from_path(DEFAULT_CHECKPOINT)
    for path in sorted((real_data / "test" / "NORMAL").iterdir()):
        pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        as_dicom = make_dicom(twelve_bit(pixels))
        if predictor.predict(pixels).in_distribution and predictor.predict(as_dicom).in_distribution:
            return pixels
    pytest.fail("no test film passes the gate")


def dicom(pixels, **tags):
    return make_dicom(twelve_bit(pixels), tags=tags)


@pytest.mark.parametrize("tags, checks", [
    ({"PatientAge": "003Y"}, []),
    ({"PatientAge": "018M"}, []),
    ({"PatientAge": "045Y"}, ["age"]),
    ({"PatientBirthDate": "19800101", "StudyDate": "20240101"}, ["age"]),
    ({"PatientBirthDate": "20210101", "StudyDate": "20240101"}, []),
    ({"ViewPosition": "LL"}, ["view"]),
    ({"ViewPosition": "PA", "BodyPartExamined": "CHEST"}, []),
    ({"BodyPartExamined": "HAND"}, ["body_part"]),
    ({"PatientAge": "xx", "ViewPosition": "", "PatientBirthDate": "1980"}, []),  # malformed: says nothing
], ids=["3y", "18m", "45y", "birth-adult", "birth-child", "lateral", "frontal-chest", "hand", "malformed"])
def test_dicom_tags_through_api_form_and_batch(child_pixels, uploads, tags, checks):
    data = dicom(child_pixels, **tags)
    body = uploads.api(data, "study.dcm").get_json()
    assert [r["check"] for r in body["population_reasons"]] == checks
    assert body["in_distribution"] is (not checks)
    assert (body["label"] is None) is bool(checks)
    html = uploads.form(data, "study.dcm").get_data(as_text=True)
    assert ('id="decision"' in html) is (not checks) and ('id="ood-warning"' in html) is bool(checks)
    row = uploads.batch_api([(data, "study.dcm")]).get_json()["results"][0]
    assert [r["check"] for r in row["population_reasons"]] == checks and (row["label"] is None) is bool(checks)


def test_ages_and_header_values_are_never_logged(child_pixels, uploads, caplog):
    import logging

    with caplog.at_level(logging.DEBUG):
        uploads.api(dicom(child_pixels, PatientAge="047Y", BodyPartExamined="KNEE"), "s.dcm", age_years="47")
        uploads.form(dicom(child_pixels, ViewPosition="RL"), "s.dcm", age_years="47")
    assert "047Y" not in caplog.text and "47 years" not in caplog.text and "KNEE" not in caplog.text
    assert "view as RL" not in caplog.text
    assert "/api/v1/predict 200" in caplog.text


def test_the_dicom_age_and_the_entered_age_must_agree(child_pixels, uploads):
    data = dicom(child_pixels, PatientAge="003Y")
    assert uploads.api(data, "s.dcm", age_years="3.5").status_code == 200
    response = uploads.api(data, "s.dcm", age_years="9")
    assert response.status_code == 400
    message = response.get_json()["error"]
    assert "9 years" in message and "3 years" in message


# ---- through the app: the age field ------------------------------------------------------


@pytest.mark.parametrize("age, status, checks", [("3", 200, []), ("1.5", 200, []), ("0,5", 200, []), ("", 200, []),
                                                 ("45", 200, ["age"]), ("6", 200, ["age"]),
                                                 ("-1", 400, None), ("131", 400, None), ("four", 400, None),
                                                 ("nan", 400, None), ("inf", 400, None)])
def test_the_age_field_on_the_api(pediatric_film, uploads, age, status, checks):
    response = uploads.api(pediatric_film, age_years=age)
    assert response.status_code == status
    body = response.get_json()
    if status == 400:
        assert "age" in body["error"]
    else:
        assert [r["check"] for r in body["population_reasons"]] == checks and (body["label"] is None) is bool(checks)


def test_the_age_field_on_the_form_and_the_batch_form(pediatric_film, uploads):
    html = uploads.form(pediatric_film, age_years="40").get_data(as_text=True)
    assert 'id="ood-warning"' in html and "40 years" in html and 'id="decision"' not in html
    films = [(pediatric_film, "a.jpeg"), (pediatric_film, "b.jpeg")]
    html = uploads.batch_form(films, age_years="40").get_data(as_text=True)
    assert html.count('class="outside"') == 2 and "PNEUMONIA suspected" not in html
    assert uploads.form(pediatric_film, age_years="abc").status_code == 400
    body = uploads.batch_api([(pediatric_film, "a.jpeg")], age_years="200").get_json()
    assert "between 0 and 130" in body["error"]


def test_the_upload_page_and_the_result_name_the_intended_use(client, uploads, pediatric_film):
    assert "children younger than 6 years" in client.get("/").get_data(as_text=True)
    assert "children younger than 6 years" in uploads.form(pediatric_film).get_data(as_text=True)
    assert "children younger than 6 years" in client.get("/model").get_data(as_text=True)


# ---- the pixels ----------------------------------------------------------------------------


def test_adult_and_lateral_films_of_held_out_patients_are_refused(app, real_adult_data):
    """The gate's figures on the development collection's held-out patients (the issue's goals)."""
    from training.data import load_adult_films
    predictor = app.extensions["model"].predictor
    adult = load_adult_films(real_adult_data, predictor.checkpoint.preprocess, None, progress=False)
    held_out = adult.held_out()
    out = predictor.predict_many(adult.films.images[held_out])
    kinds = adult.films.labels[held_out]
    flagged = out.ood_scores > 1
    assert flagged[kinds == 1].mean() >= 0.90 and flagged[kinds == 2].mean() >= 0.95
    stored = predictor.checkpoint.metrics["population_gate"]
    assert flagged[kinds == 1].mean() == pytest.approx(stored[ADULT_HELD_OUT]["flagged"])
    # the reason names adults: alone where only the population gate refused the film,
    # among the possibilities where the other part of the gate refused it too
    reasons = out.outside[kinds == 1][flagged[kinds == 1]]
    assert np.mean(reasons == "adult") > 0.5 and np.mean(np.isin(reasons, ["adult", "unlike"])) > 0.95


def test_a_flagged_film_has_no_decision_in_the_batch_table(uploads, pediatric_film):
    photo = encode(np.random.default_rng(2).integers(0, 256, (300, 300), dtype=np.uint8), ".png")
    html = uploads.batch_form([(pediatric_film, "child.jpeg"), (photo, "photo.png")]).get_data(as_text=True)
    rows = html.split("<tr")[2:]
    assert "child.jpeg" in rows[0] and ("NORMAL" in rows[0] or "PNEUMONIA suspected" in rows[0])
    assert "photo.png" in rows[1] and 'class="outside"' in rows[1] and "no result" in rows[1]
    photo_probability = network_probability(uploads.api(photo).get_json())
    assert f"{100 * photo_probability:.1f}%" not in rows[1] and "%" not in rows[1]  # no number on a refused row


def test_old_checkpoints_without_a_population_gate_still_refuse_by_metadata(tmp_path, make_app):
    old = dataclasses.replace(load_checkpoint(DEFAULT_CHECKPOINT), population_gate=None)
    save_checkpoint(old, tmp_path / "old.pt")
    client = make_app(CHECKPOINT_PATH=str(tmp_path / "old.pt")).test_client()
    body = Uploads(client).api(encode(synthetic_xray(400, 320), ".png"), age_years="30").get_json()
    assert "age" in [r["check"] for r in body["population_reasons"]] and body["label"] is None


@pytest.mark.parametrize("input_pool", [1, 2])
def test_the_gate_runs_its_members_as_one_network_with_the_same_answers(input_pool):
    """``StackedPopulationNets`` (grouped convolutions, BatchNorm folded) against each member run alone."""
    torch.manual_seed(0)
    members = []
    for _ in range(3):
        net = PopulationNet((8, 16, 16, 24), input_pool=input_pool)
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.bias.uniform_(-0.2, 0.2)
        members.append(net.eval())
    gate = PopulationGate.from_dict(PopulationGate((8, 16, 16, 24), [m.state_dict() for m in members], threshold=0.5,
                                                   input_pool=input_pool).to_dict())  # as a checkpoint holds it
    x = np.random.default_rng(0).random((5, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        inputs = torch.from_numpy(x).unsqueeze(1)
        each = torch.stack([m(inputs) for m in members], dim=1)  # (N, members, kinds)
        torch.testing.assert_close(gate.stacked(inputs), each, rtol=1e-4, atol=1e-5)
        expected = torch.softmax(each, dim=2).mean(dim=1).numpy()
    np.testing.assert_allclose(gate.probabilities(x), expected, atol=1e-6)
    np.testing.assert_allclose(gate.probabilities(x[2:3]), expected[2:3], atol=1e-6)  # one image alone


def test_the_head_is_the_fitted_logistic_regression_and_survives_a_checkpoint(tmp_path):
    """Standardisation folded into the weights: the same probabilities as scikit-learn's; a film's kind
    is the likelier of adult and lateral; the arrays go through ``torch.save``/``load`` (weights only)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    taps = rng.normal(size=(300, 12)) * rng.uniform(0.5, 3, 12) + rng.normal(size=12)
    kinds = np.repeat([0, 1, 2], 100)
    taps[kinds == 1, :3] += 2.0
    taps[kinds == 2, 3:6] -= 2.0
    mean, scale = taps.mean(axis=0), taps.std(axis=0)
    regression = LogisticRegression(C=0.5, max_iter=2000).fit((taps - mean) / scale, kinds)
    head = PopulationHead(mean, scale, regression.coef_, regression.intercept_, threshold=0.3)
    torch.save(head.to_dict(), tmp_path / "head.pt")
    head = PopulationHead.from_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    expected = regression.predict_proba((taps - mean) / scale)
    np.testing.assert_allclose(head.probabilities(taps.astype(np.float32)), expected, atol=1e-5)
    scores, named = head.assess(np.zeros((300, 64, 64)), taps.astype(np.float32))
    np.testing.assert_allclose(scores, (1 - expected[:, 0]) / 0.3, atol=1e-4)
    np.testing.assert_array_equal(named, np.array(KINDS)[1 + np.argmax(expected[:, 1:], axis=1)])
    assert (named[kinds == 1] == "adult").mean() > 0.9 and (named[kinds == 2] == "lateral").mean() > 0.9


def test_the_head_weighs_each_kind_alike_and_normal_children_as_much_as_pneumonia():
    """Counted as they come, three pneumonia films in four set the children's side of the boundary,
    while the children it refused as adults were all normal."""
    from sklearn.utils.class_weight import compute_sample_weight

    from training.population import fit_weights

    kinds = np.r_[np.zeros(12, int), np.ones(5, int), np.full(3, 2)]
    pneumonia = np.r_[np.ones(9, int), np.zeros(3, int)]
    weights = fit_weights(kinds, pneumonia)
    assert [weights[kinds == k].sum() for k in range(3)] == pytest.approx([20 / 3] * 3)
    children = weights[:12]
    assert children[pneumonia == 0].sum() == pytest.approx(children[pneumonia == 1].sum())
    assert children[pneumonia == 0][0] == pytest.approx(3 * children[pneumonia == 1][0])
    # without the children's labels: scikit-learn's "balanced" class weights, as before
    np.testing.assert_allclose(fit_weights(kinds, None), compute_sample_weight("balanced", kinds))
    with pytest.raises(ValueError, match="11 children's labels for 12"):
        fit_weights(kinds, pneumonia[:11])


def _with_population_gate(gate, tmp_path):
    checkpoint = dataclasses.replace(load_checkpoint(DEFAULT_CHECKPOINT), population_gate=gate)
    return save_checkpoint(checkpoint, tmp_path / "ck.pt")


def test_a_head_fitted_on_other_activations_is_refused(tmp_path):
    head = load_checkpoint(DEFAULT_CHECKPOINT).population_gate
    assert isinstance(head, PopulationHead)
    narrow = PopulationHead(head.mean[:-4], head.scale[:-4], head.weight[:, :-4], head.bias, head.threshold)
    with pytest.raises(CheckpointError, match="reads 380 numbers a film, the network gives 384"):
        load_checkpoint(_with_population_gate(narrow, tmp_path))
    raw = torch.load(_with_population_gate(head, tmp_path), weights_only=True)
    raw["population_gate"]["taps"] = {"blocks": [2, 3], "grid": 2}  # as a head fitted elsewhere records it
    torch.save(raw, tmp_path / "elsewhere.pt")
    with pytest.raises(CheckpointError, match="fitted on activations"):
        load_checkpoint(tmp_path / "elsewhere.pt")


def test_checkpoints_with_population_networks_still_load_and_refuse(tmp_path, make_app, pediatric_film):
    """Versions made before the head carry small networks of their own; a store may still serve one."""
    torch.manual_seed(0)
    networks = PopulationGate((8, 8, 8, 8), [PopulationNet((8, 8, 8, 8)).eval().state_dict()], threshold=1e-4)
    path = _with_population_gate(networks, tmp_path)
    assert isinstance(load_checkpoint(path).population_gate, PopulationGate)
    body = Uploads(make_app(CHECKPOINT_PATH=str(path)).test_client()).api(pediatric_film).get_json()
    assert body["label"] is None and [r["check"] for r in body["population_reasons"]] == ["image"]


def test_a_refused_adult_film_shows_no_probability_on_the_page_or_in_the_batch(uploads, real_adult_data):
    """A number beside a refusal reads as the answer: the pages show none (the API keeps it for research)."""
    frontal = sorted((real_adult_data / "frontal").iterdir())
    body, film = None, None
    for path in frontal:  # the first adult film the gate refuses
        film = path.read_bytes()
        body = uploads.api(film, path.name).get_json()
        if body.get("in_distribution") is False:
            break
    assert body["in_distribution"] is False and 0 <= network_probability(body) <= 1
    number = f"{100 * network_probability(body):.1f}%"
    page = uploads.form(film).get_data(as_text=True)
    assert 'id="ood-warning"' in page and number not in page and 'id="probability"' not in page
    rows = uploads.batch_form([(film, "adult.jpeg")]).get_data(as_text=True).split("<tr")[2:]
    assert 'class="outside"' in rows[0] and "%" not in rows[0]
