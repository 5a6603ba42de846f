"""Grad-CAM: computed from the prediction's own forward pass, on the page and in the API."""
import base64

import cv2
import numpy as np
import pytest
import torch

from model import Ensemble, PneumoniaNet
from model.saliency import grad_cam
from tests.support.images import encode, synthetic_xray

XRAY = encode(synthetic_xray(400, 320), ".png")


def test_grad_cam_follows_the_evidence():
    """A network whose logit depends only on the left half must light up the left half."""
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    with torch.no_grad():
        net.head[1].weight.fill_(0.1)
    x = torch.zeros((1, 1, 64, 64))
    x[0, 0, 16:48, 4:28] = 1.0  # a bright patch on the left only
    with torch.enable_grad():
        cam = grad_cam(Ensemble([net]).eval().infer(x), 64)[0]
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0)
    assert cam[:, :32].sum() > cam[:, 32:].sum()


def test_an_ensemble_s_map_is_the_mean_of_its_members_maps():
    torch.manual_seed(1)
    members = [PneumoniaNet().eval() for _ in range(2)]
    x = torch.rand(1, 1, 64, 64)
    with torch.enable_grad():
        raw = [grad_cam(Ensemble([m]).eval().infer(x), 64)[0] for m in members]
        both = grad_cam(Ensemble(members).eval().infer(x), 64)[0]
    assert both.max() == pytest.approx(1.0)
    assert np.corrcoef(both.ravel(), (raw[0] + raw[1]).ravel())[0, 1] > 0.5


def test_saliency_does_not_change_the_prediction(app):
    predictor = app.extensions["model"].predictor
    plain, with_map = predictor.predict(XRAY), predictor.predict(XRAY, saliency=True)
    assert plain.saliency is None and with_map.saliency.shape == (64, 64)
    assert with_map.probability == pytest.approx(plain.probability, abs=1e-6)
    assert with_map.ood_score == pytest.approx(plain.ood_score, abs=1e-6)


def test_api_returns_the_heat_map_only_when_asked(uploads):
    assert "saliency_png" not in uploads.api(XRAY).get_json()
    body = uploads.api(XRAY, query="?saliency=1").get_json()
    image = cv2.imdecode(np.frombuffer(base64.b64decode(body["saliency_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (256, 256, 3)
