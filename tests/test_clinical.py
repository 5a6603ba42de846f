"""Saliency, the out-of-population gate, calibration, DICOM and batch upload in the app."""
import base64
import io
import logging
import re

import cv2
import numpy as np
import pytest

from app import create_app
from conftest import encode, synthetic_xray
from dicom_files import PATIENT_ID, PATIENT_NAME, make_dicom, twelve_bit
from model import Predictor
from model.saliency import grad_cam
from model.settings import DEFAULT_CHECKPOINT

XRAY = encode(synthetic_xray(400, 320), ".png")


@pytest.fixture(scope="module")
def app():
    return create_app({"TESTING": True, "SECRET_KEY": "clinical", "MAX_BATCH_FILES": 5})


@pytest.fixture
def client(app):
    return app.test_client()


def token(client):
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").get_data(as_text=True)).group(1)


# ---- saliency ----------------------------------------------------------------------


def test_grad_cam_follows_the_evidence():
    """A network whose logit depends only on the left half must light up the left half."""
    import torch

    from model import Ensemble, PneumoniaNet

    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    with torch.no_grad():
        net.head[1].weight.fill_(0.1)
    x = np.zeros((1, 64, 64), np.float32)
    x[0, 16:48, 4:28] = 1.0  # a bright patch on the left only
    cam = grad_cam(Ensemble([net]).eval(), x)[0]
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0)
    assert cam[:, :32].sum() > cam[:, 32:].sum()


def test_api_returns_the_heat_map_only_when_asked(client):
    plain = client.post("/api/v1/predict", data={"image": (io.BytesIO(XRAY), "x.png")}).get_json()
    assert "saliency_png" not in plain
    body = client.post("/api/v1/predict?saliency=1", data={"image": (io.BytesIO(XRAY), "x.png")}).get_json()
    png = base64.b64decode(body["saliency_png"])
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (256, 256, 3)


# ---- out-of-population gate --------------------------------------------------------


def non_xray_images() -> list[tuple[str, np.ndarray]]:
    """Natural photos, documents, other modalities (scikit-image's bundled samples) and synthetic pictures."""
    from skimage import data

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "text", "page", "moon", "horse", "clock",
             "hubble_deep_field", "immunohistochemistry", "logo", "retina", "cat", "brick", "grass", "gravel",
             "checkerboard", "binary_blobs", "colorwheel", "shepp_logan_phantom", "cell", "microaneurysms"]
    images = []
    for name in names:
        image = np.asarray(getattr(data, name)())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype.kind == "f":
            image = np.uint8(np.clip(image, 0, 1) * 255)
        images.append((name, image))
    rng = np.random.default_rng(0)
    document = np.full((400, 300), 245, np.uint8)
    for i, line in enumerate(["DISCHARGE SUMMARY", "Patient seen in clinic", "Temp 38.2 C, cough 3 days",
                              "Plan: chest film, review", "Signed: Dr. A. Example"]):
        cv2.putText(document, line, (12, 40 + 40 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.55, 20, 1)
    yy, xx = np.mgrid[0:256, 0:256]
    images += [
        ("uniform-noise", rng.integers(0, 256, (256, 256), dtype=np.uint8)),
        ("gaussian-noise", np.uint8(np.clip(rng.normal(128, 40, (256, 256)), 0, 255))),
        ("gradient", np.uint8(xx)),
        ("black", np.zeros((256, 256), np.uint8)),
        ("white", np.full((256, 256), 255, np.uint8)),
        ("stripes", np.uint8((xx // 16 % 2) * 255)),
        ("circle", np.uint8(((xx - 128) ** 2 + (yy - 128) ** 2 < 80**2) * 255)),
        ("document", document),
    ]
    return images


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_path(DEFAULT_CHECKPOINT)


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
    assert len(non_xray_images()) >= 30
    assert missed == []


def test_gate_passes_the_test_split(predictor, real_data):
    from training.data import load_split

    split = load_split(real_data, "test", predictor.checkpoint.preprocess, cache_dir=None, progress=False)
    flagged = float(np.mean(predictor.predict_batch(split.images).ood_scores > 1))
    assert flagged <= 0.05
    assert flagged == pytest.approx(predictor.checkpoint.metrics["test"]["ood_flagged"], abs=1e-9)


def test_result_page_and_api_say_so_plainly(client):
    photo = encode(np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8), ".png")
    body = client.post("/api/v1/predict", data={"image": (io.BytesIO(photo), "p.png")}).get_json()
    assert body["in_distribution"] is False and body["ood_score"] > 1
    html = client.post("/predict", data={"csrf_token": token(client), "image": (io.BytesIO(photo), "p.png")}).get_data(as_text=True)
    assert 'id="ood-warning"' in html and "not reliable" in html


# ---- calibration -------------------------------------------------------------------


def test_temperature_scaling_recovers_a_known_miscalibration():
    from training.calibrate import fit_temperature, reliability

    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-true_logits))
    overconfident = 3 * true_logits - 1  # temperature 1/3 and a shift
    fitted = fit_temperature(overconfident, labels)
    assert fitted["temperature"] == pytest.approx(3, rel=0.1) and fitted["bias"] == pytest.approx(1 / 3, abs=0.1)
    from model.predictor import calibrate

    assert reliability(labels, calibrate(overconfident, fitted))["ece"] < 0.02
    assert reliability(labels, 1 / (1 + np.exp(-overconfident)))["ece"] > 0.05


def test_model_card_shows_reliability_diagrams_and_ece(client):
    html = client.get("/model").get_data(as_text=True)
    assert html.count("Reliability diagram") == 2 and "ECE" in html and "Out-of-population gate" in html


# ---- DICOM through the app ---------------------------------------------------------


def test_dicom_through_the_api_and_the_form_without_patient_data(client, caplog):
    dicom = make_dicom(twelve_bit(synthetic_xray(400, 320)))
    with caplog.at_level(logging.DEBUG):
        response = client.post("/api/v1/predict", data={"image": (io.BytesIO(dicom), "study.dcm")})
        page = client.post("/predict", data={"csrf_token": token(client), "image": (io.BytesIO(dicom), "study.dcm")})
    assert response.status_code == 200 and page.status_code == 200
    expected = client.post("/api/v1/predict", data={"image": (io.BytesIO(XRAY), "x.png")}).get_json()["probability"]
    assert response.get_json()["probability"] == pytest.approx(expected, abs=0.05)
    page_text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page.get_data(as_text=True))
    for text in (response.get_data(as_text=True), page_text, caplog.text):
        assert "Doe" not in text and PATIENT_ID not in text and PATIENT_NAME not in text


def test_non_radiograph_dicom_is_refused(client):
    ct = make_dicom(twelve_bit(synthetic_xray(300, 300)), modality="CT")
    response = client.post("/api/v1/predict", data={"image": (io.BytesIO(ct), "ct.dcm")})
    assert response.status_code == 400 and "CT study" in response.get_json()["error"]


# ---- batch -------------------------------------------------------------------------


def batch_files():
    return [
        (io.BytesIO(XRAY), "first.png"),
        (io.BytesIO(b"not an image"), "notes.txt"),
        (io.BytesIO(encode(synthetic_xray(380, 300, seed=3), ".jpg")), "second.jpg"),
        (io.BytesIO(make_dicom(twelve_bit(synthetic_xray(360, 300, seed=4)))), "third.dcm"),
    ]


def test_batch_api_answers_one_row_per_file_with_refusals(client):
    body = client.post("/api/v1/predict/batch", data={"images": batch_files()}).get_json()
    rows = body["results"]
    assert [r["filename"] for r in rows] == ["first.png", "notes.txt", "second.jpg", "third.dcm"]
    assert rows[1]["status"] == 415 and "not an image" in rows[1]["error"]
    assert all(0 <= r["probability"] <= 1 for r in rows if "error" not in r)


def test_batch_page_is_a_table_sorted_by_probability(client):
    html = client.post("/predict/batch", data={"csrf_token": token(client), "images": batch_files()}).get_data(as_text=True)
    values = [float(v) for v in re.findall(r'data-value="([-\d.e]+)"', html)]
    assert len(values) == 4 and values[-1] == -1  # the refusal sorts last
    assert values[:3] == sorted(values[:3], reverse=True)
    assert "notes.txt" in html and "refused" in html and 'class="metrics sortable"' in html


def test_batch_file_count_limit(client):
    files = [(io.BytesIO(XRAY), f"{i}.png") for i in range(6)]
    response = client.post("/api/v1/predict/batch", data={"images": files})
    assert response.status_code == 400 and "at most 5" in response.get_json()["error"]
