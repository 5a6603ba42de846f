"""Every page, the API and every refusal, through Flask's test client."""
import io
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
from itsdangerous import BadSignature
from PIL import Image

from app import create_app
from harness.images import encode, synthetic_xray
from model import CheckpointError
from model.settings import REPO_ROOT
from tests.client import CSRF, Uploads, network_probability


def png(array: np.ndarray) -> bytes:
    return encode(array, ".png")


XRAY = png(synthetic_xray(400, 320))


# ---- pages -------------------------------------------------------------------------


def test_upload_page_shows_formats_limit_and_a_form_that_works_without_javascript(client):
    html = client.get("/").get_data(as_text=True)
    assert 'enctype="multipart/form-data"' in html and 'type="file"' in html and 'name="image"' in html
    assert "JPEG" in html and "PNG" in html and "20 MB" in html
    assert CSRF.search(html)


def test_result_page_shows_probability_decision_threshold_images_and_disclaimer(app, uploads, pediatric_film):
    response = uploads.form(pediatric_film)
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    probability = float(re.search(r'id="probability">([\d.]+)%', html).group(1))
    decision = re.search(r'id="decision">([^<]+)<', html).group(1)
    threshold = app.extensions["model"].predictor.threshold
    assert decision == ("PNEUMONIA suspected" if probability / 100 >= threshold - 5e-4 else "NORMAL")
    assert f"{100 * threshold:.1f}%" in html
    assert html.count('src="data:image/png;base64,') == 3  # model input, aligned, heat map
    assert "Where this film pushed the pneumonia score up" in html and 'id="probability-meaning"' in html
    assert "not a diagnosis" in html
    assert app.extensions["model"].predictor.version in html
    assert "specificity" in html and 'href="/"' in html
    assert response.headers["Cache-Control"] == "no-store"


def test_form_without_csrf_token_is_refused(client):
    response = client.post("/predict", data={"image": (io.BytesIO(XRAY), "x.png")}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "reload the page" in response.get_data(as_text=True)


def test_the_session_signer_is_made_once_and_follows_a_new_key(app, client):
    sessions = app.session_interface
    signer = sessions.get_signing_serializer(app)
    assert sessions.get_signing_serializer(app) is signer
    old_cookie = signer.dumps({"csrf_token": "made under the old key"})
    app.secret_key = "another key"
    with pytest.raises(BadSignature):  # a cookie signed with the old key no longer opens
        sessions.get_signing_serializer(app).loads(old_cookie)
    assert Uploads(client).form(XRAY).status_code == 200  # and forms work under the new one


def test_form_refusal_is_a_page_with_the_message(client, uploads):
    response = uploads.form(b"%PDF-1.4 not an image")
    html = response.get_data(as_text=True)
    assert response.status_code == 415
    assert "not an image" in html and "Upload another image" in html
    assert "Traceback" not in html


def test_model_card_shows_metrics_roc_and_confusion_matrix(client, app):
    html = client.get("/model").get_data(as_text=True)
    checkpoint = app.extensions["model"].predictor.checkpoint
    assert checkpoint.version in html
    assert "Operating threshold" in html and "validation" in html and "test" in html
    assert html.count('class="roc"') == 2 and html.count("Confusion matrix") >= 2
    assert str(checkpoint.metrics["test"]["confusion"]["fn"]) in html


def test_analysis_page_shows_the_bundled_map_of_the_bundled_model(client, app):
    html = client.get("/analysis").get_data(as_text=True)
    assert "Training split" in html and "Learned features" in html
    assert app.extensions["model"].predictor.version in html
    assert 'id="stale"' not in html and 'id="no-artifact"' not in html


def test_healthz(client, app):
    body = client.get("/healthz").get_json()
    assert body == {"status": "ok", "model_loaded": True, "model_version": app.extensions["model"].predictor.version,
                    "model_runtime": "onnxruntime", "record": "ok"}


def test_healthz_reports_a_model_that_gives_no_finite_answer(make_app):
    app = make_app()
    predictor = app.extensions["model"].predictor
    predictor.checkpoint.calibration["bias"] = float("nan")  # a model whose every probability is NaN
    predictor.__dict__.pop("works", None)  # the self-check runs again on the broken model
    response = app.test_client().get("/healthz")
    assert response.status_code == 503 and response.get_json()["model_loaded"] is False


def test_unknown_page_is_a_clean_404(client):
    response = client.get("/nope")
    assert response.status_code == 404 and "Traceback" not in response.get_data(as_text=True)


# ---- API ---------------------------------------------------------------------------


def test_api_predict_answers_the_documented_fields(app, uploads, pediatric_film):
    response = uploads.api(pediatric_film)
    body = response.get_json()
    assert response.status_code == 200
    assert set(body) == {"probability", "label", "threshold", "model_version", "in_distribution", "ood_score",
                         "population_reasons", "calibration_prevalence", "case_id"}
    validation = app.extensions["model"].predictor.checkpoint.training_data["validation"]
    assert body["calibration_prevalence"] == validation["pneumonia"] / validation["images"]
    assert body["in_distribution"] is True and body["population_reasons"] == []
    assert 0 <= network_probability(body) <= 1
    assert body["label"] == ("PNEUMONIA" if network_probability(body) >= body["threshold"] else "NORMAL")
    assert body["model_version"] == app.extensions["model"].predictor.version
    assert response.headers["Cache-Control"] == "no-store"


def test_api_agrees_with_the_predictor(client, app, uploads):
    expected = app.extensions["model"].predictor.predict(XRAY).probability
    assert network_probability(uploads.api(XRAY).get_json()) == pytest.approx(expected, abs=1e-6)


def sixteen_bit_png():
    return png((synthetic_xray(300, 300, dtype=np.uint16) >> 4).astype(np.uint16))


def rgba_png():
    gray = synthetic_xray(300, 260)
    return png(np.dstack([gray, gray, gray, np.full_like(gray, 200)]))


def exif_rotated_jpeg():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(synthetic_xray(320, 280)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def other_format(fmt):
    buffer = io.BytesIO()
    Image.fromarray(synthetic_xray(300, 280)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make",
    [sixteen_bit_png, rgba_png, exif_rotated_jpeg, lambda: other_format("TIFF"), lambda: other_format("BMP"),
     lambda: other_format("WEBP"), lambda: encode(synthetic_xray(300, 300), ".jpg")],
    ids=["png16", "rgba", "exif", "tiff", "bmp", "webp", "jpeg"],
)
def test_api_accepts_still_image_formats(client, make, uploads):
    response = uploads.api(make())
    assert response.status_code == 200, response.get_json()


def animated_gif():
    frames = [Image.fromarray(synthetic_xray(200, 200, seed=i)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def truncated_jpeg():
    data = encode(synthetic_xray(400, 400), ".jpg")
    return data[: len(data) // 2]


def pixel_bomb():
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, "PNG")  # 64 megapixels in a few KB
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"", 400, "empty"),
        (b"this is a text file, not an x-ray", 415, "not an image"),
        (truncated_jpeg(), 400, "truncated or corrupt"),
        (pixel_bomb(), 413, "megapixels"),
        (png(np.zeros((20, 20), np.uint8)), 400, "too small"),
        (png(np.zeros((2000, 100), np.uint8)), 400, "elongated"),
        (animated_gif(), 400, "frames"),
    ],
    ids=["empty", "text", "truncated", "bomb", "tiny", "strip", "animation"],
)
def test_api_refusals(client, data, status, words, uploads):
    response = uploads.api(data)
    assert response.status_code == status
    assert words in response.get_json()["error"]


def test_api_refuses_a_request_without_a_file(client, uploads):
    response = uploads.api(None)
    assert response.status_code == 400 and "No file" in response.get_json()["error"]


def test_api_refuses_a_file_in_another_field(client, uploads):
    response = uploads.api(XRAY, field="file")
    assert response.status_code == 400 and "'image'" in response.get_json()["error"]


def test_api_refuses_two_files(client):
    response = client.post(
        "/api/v1/predict",
        data={"image": [(io.BytesIO(XRAY), "a.png"), (io.BytesIO(XRAY), "b.png")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400 and "exactly one" in response.get_json()["error"]


def test_too_many_bytes_is_413(make_app):
    app = make_app(MAX_CONTENT_LENGTH=50_000)
    response = Uploads(app.test_client()).api(b"\0" * 60_000)
    assert response.status_code == 413 and "limit" in response.get_json()["error"]


def test_wrong_method_on_the_api_is_json(client):
    response = client.get("/api/v1/predict")
    assert response.status_code == 405 and "error" in response.get_json()


# ---- security and privacy ----------------------------------------------------------


def test_security_headers(client):
    response = client.get("/")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http" not in csp  # no third-party origin anywhere in the policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_uploads_are_kept_in_memory_even_when_large(app):
    noise = np.random.default_rng(0).integers(0, 255, (1200, 1200), dtype=np.uint8)
    data = png(noise)
    assert len(data) > 1_000_000  # far above werkzeug's 500 KB spooling threshold
    with app.test_request_context(
        "/api/v1/predict", method="POST", data={"image": (io.BytesIO(data), "x.png")},
        content_type="multipart/form-data",
    ):
        from flask import request

        assert isinstance(request.files["image"].stream, io.BytesIO)


def test_logs_hold_no_file_name_or_image_content(client, caplog, uploads):
    with caplog.at_level(logging.DEBUG):
        uploads.api(XRAY, filename="Jane_Doe_1990-01-01.png")
    text = caplog.text
    assert "Jane_Doe" not in text
    assert "iVBOR" not in text and "PNG" not in text  # no raw or base64 PNG bytes
    assert "/api/v1/predict 200" in text


def test_random_secret_key_when_unset_with_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        first = create_app({"TESTING": True})
    second = create_app({"TESTING": True})
    assert first.config["SECRET_KEY"] != second.config["SECRET_KEY"]
    assert "SECRET_KEY is not set" in caplog.text


# ---- start-up ----------------------------------------------------------------------


def test_missing_checkpoint_stops_create_app(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        create_app({"CHECKPOINT_PATH": str(tmp_path / "missing.pt")})


@pytest.mark.parametrize("content", [None, b"garbage" * 100], ids=["missing", "corrupt"])
def test_wsgi_start_up_fails_with_one_clear_line(tmp_path, content):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        cwd=REPO_ROOT,
        env={"PNEUMONIA_CHECKPOINT": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and str(path) in lines[0]
