"""Several files at once: one row per file, refusals included, through the page and the API."""
import re

import numpy as np
import pytest

from harness.dicom_files import make_dicom, twelve_bit
from harness.images import encode, synthetic_xray
from tests.client import Uploads, network_probability

XRAY = encode(synthetic_xray(400, 320), ".png")


def batch_files():
    return [
        (XRAY, "first.png"),
        (b"not an image", "notes.txt"),
        (encode(synthetic_xray(380, 300, seed=3), ".jpg"), "second.jpg"),
        (make_dicom(twelve_bit(synthetic_xray(360, 300, seed=4))), "third.dcm"),
    ]


def test_batch_api_answers_one_row_per_file_with_refusals(uploads):
    body = uploads.batch_api(batch_files()).get_json()
    rows = body["results"]
    assert [r["filename"] for r in rows] == ["first.png", "notes.txt", "second.jpg", "third.dcm"]
    assert rows[1]["status"] == 415 and "not an image" in rows[1]["error"]
    assert all(0 <= network_probability(r) <= 1 for r in rows if "error" not in r)


def test_batch_page_is_a_table_sorted_by_probability(uploads):
    html = uploads.batch_form(batch_files()).get_data(as_text=True)
    values = [float(v) for v in re.findall(r'data-value="([-\d.e]+)"', html)]
    assert len(values) == 4 and values[-1] == -1  # the refusal sorts last
    assert values[:3] == sorted(values[:3], reverse=True)
    assert "notes.txt" in html and "not read" in html and 'class="metrics sortable batch"' in html
    assert 'aria-sort="descending">Probability of pneumonia' in html  # as the server sorted it


def test_batch_file_count_limit(make_app):
    files = [(XRAY, f"{i}.png") for i in range(6)]
    response = Uploads(make_app(MAX_BATCH_FILES=5).test_client()).batch_api(files)
    assert response.status_code == 400 and "at most 5" in response.get_json()["error"]


def test_a_batch_answers_exactly_what_single_uploads_answer(app, uploads):
    files = [(encode(synthetic_xray(380 + 10 * i, 300, seed=i), ".jpg"), f"{i}.jpg") for i in range(5)]
    rows = uploads.batch_api(files).get_json()["results"]
    predictor = app.extensions["model"].predictor
    for (data, _), row in zip(files, rows):
        single = predictor.predict(data)
        assert network_probability(row) == pytest.approx(single.probability, abs=1e-5)
        assert (row.get("ood_score") or row["research"]["ood_score"]) == pytest.approx(single.ood_score, abs=1e-4)
        assert row["label"] == single.label


def test_a_raw_body_upload_answers_like_multipart(client, uploads):
    raw = client.post("/api/v1/predict?age_years=40", data=XRAY, content_type="image/png").get_json()
    form = uploads.api(XRAY, age_years="40").get_json()
    assert raw.pop("case_id") != form.pop("case_id")  # two cases
    assert raw == form and "age" in [r["check"] for r in raw["population_reasons"]]
    assert client.post("/api/v1/predict", data=b"", content_type="image/jpeg").status_code == 400


def test_a_raw_body_over_the_size_limit_is_413(make_app):
    client = make_app(MAX_CONTENT_LENGTH=50_000).test_client()
    response = client.post("/api/v1/predict", data=b"\xff" * 60_000, content_type="image/jpeg")
    assert response.status_code == 413 and "limit" in response.get_json()["error"]


def test_a_refused_noise_image_shows_no_probability_on_its_page_or_its_batch_row(uploads):
    noise = encode(np.random.default_rng(5).integers(0, 256, (400, 400), dtype=np.uint8), ".png")
    body = uploads.api(noise).get_json()
    assert body["in_distribution"] is False and 0 <= network_probability(body) <= 1  # kept for research, in the API
    number = f"{100 * network_probability(body):.1f}%"
    page = uploads.form(noise).get_data(as_text=True)
    assert 'id="no-probability"' in page and 'id="probability"' not in page and number not in page
    rows = uploads.batch_form([(noise, "noise.png"), (XRAY, "x.png")]).get_data(as_text=True).split("<tr")[2:]
    noise_row = next(row for row in rows if "noise.png" in row)
    assert 'class="outside"' in noise_row and "%" not in noise_row
