"""Hostile uploads through the form and the API: a clear 4xx or a correct prediction, never a 5xx."""
import io

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.hostile import corpus
from harness.images import encode, synthetic_xray
from model import ImageError, preprocess
from tests.client import network_probability

CASES = corpus()
VALID = encode(synthetic_xray(400, 320), ".png")


@pytest.fixture(scope="module")
def expected_valid(app):
    return app.extensions["model"].predictor.predict(VALID).probability


def check(response, expected, is_json):
    assert response.status_code < 500
    if expected == "refuse" or (expected == "either" and response.status_code != 200):
        assert 400 <= response.status_code < 500
        message = response.get_json()["error"] if is_json else response.get_data(as_text=True)
        assert message and "Traceback" not in message
    else:
        assert response.status_code == 200
        if is_json:
            assert 0 <= network_probability(response.get_json()) <= 1


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_api_and_form_answer_each_file_and_keep_serving(uploads, case, expected_valid):
    _, filename, data, expected = case
    check(uploads.api(data, filename), expected, is_json=True)
    check(uploads.form(data, filename), expected, is_json=False)
    after = uploads.api(VALID)
    assert after.status_code == 200 and network_probability(after.get_json()) == pytest.approx(expected_valid, abs=1e-6)


def test_multipart_without_a_file_part(client):
    response = client.post("/api/v1/predict", data={"note": "no file here"}, content_type="multipart/form-data")
    assert response.status_code == 400 and "No file" in response.get_json()["error"]


def test_two_file_parts(client):
    files = {"image": (io.BytesIO(VALID), "a.png"), "other": (io.BytesIO(VALID), "b.png")}
    response = client.post("/api/v1/predict", data=files, content_type="multipart/form-data")
    assert response.status_code == 400 and "exactly one" in response.get_json()["error"]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type(client, content_type):
    response = client.post("/api/v1/predict", data=VALID, content_type=content_type)
    assert response.status_code == 400 and "No file" in response.get_json()["error"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_raw_body_uploads_answer_each_file_like_multipart(client, case, expected_valid):
    _, _, data, expected = case
    check(client.post("/api/v1/predict", data=data, content_type="application/octet-stream"), expected, is_json=True)
    after = client.post("/api/v1/predict", data=VALID, content_type="image/png")
    assert after.status_code == 200 and network_probability(after.get_json()) == pytest.approx(expected_valid, abs=1e-6)


def test_memory_stays_bounded_across_the_corpus(uploads):
    process = psutil.Process()
    for case in CASES:  # warm-up pass: allocator pools, lazy imports
        uploads.api(case[2], case[1])
    before = process.memory_info().rss
    for _ in range(3):
        for case in CASES:
            uploads.api(case[2], case[1])
    grown_mb = (process.memory_info().rss - before) / 1024**2
    print(f"RSS growth over 3 passes of {len(CASES)} files: {grown_mb:.1f} MB")
    assert grown_mb < 50


# ---- property-based: decode + preprocessing on random and mutated bytes --------------

SEEDS = [encode(synthetic_xray(160, 140), ext) for ext in (".png", ".jpg", ".bmp", ".tiff")]


def assert_clean(data: bytes):
    try:
        out = preprocess(data)
    except ImageError:
        return
    assert out.shape == (64, 64) and 0 <= out.min() and out.max() <= 1


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_our_error(data):
    assert_clean(data)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.floats(0.05, 1)),
)
def test_mutated_images_raise_only_our_error(seed, edits, cut):
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[int(position * len(data))] = value
    if cut is not None:
        data = data[: max(1, int(cut * len(data)))]
    assert_clean(bytes(data))
