"""Grad-CAM: computed from the prediction's own forward pass, on the page and in the API."""
import base64

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from harness.images import encode, synthetic_xray
from model import Ensemble, PneumoniaNet, for_inference
from model.saliency import grad_cam

XRAY = encode(synthetic_xray(400, 320), ".png")


def trained_looking(seed: int) -> PneumoniaNet:
    """Random weights and BatchNorm statistics (a fresh BatchNorm is the identity)."""
    torch.manual_seed(seed)
    net = PneumoniaNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        net.head[1].weight.normal_(0, 1)
    return net.eval()


def autograd_grad_cam(model: Ensemble, x: torch.Tensor, size: int) -> np.ndarray:
    """Grad-CAM by its definition: gradients of the mean logit from a backward pass."""
    with torch.enable_grad():
        out = model.infer(x)
        gradients = torch.autograd.grad(out.logits.sum(), out.activations)
    cams = sum(F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True))
               for g, a in zip(gradients, out.activations)).detach()
    cams = F.interpolate(cams, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    return cams / np.maximum(cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1), 1e-8)


@pytest.mark.parametrize("members", [1, 2])
def test_the_map_without_a_backward_pass_is_grad_cam(members):
    """The channel weights read from the head equal the mean gradients a backward pass gives."""
    model = Ensemble([trained_looking(seed) for seed in range(members)]).eval()
    x = torch.rand(3, 1, 64, 64)
    expected = autograd_grad_cam(model, x, 64)
    with torch.inference_mode():
        out = model.infer(x)
    cams = grad_cam(model, out, 64)
    assert cams.shape == (3, 64, 64) and expected.max() > 0
    np.testing.assert_allclose(cams, expected, atol=1e-5)
    served = for_inference(model)  # BatchNorm folded, channels-last: the same map
    with torch.inference_mode():
        np.testing.assert_allclose(grad_cam(served, served.infer(x), 64), expected, atol=1e-4)


def test_the_served_network_computes_what_the_trained_one_does():
    model = Ensemble([trained_looking(0), trained_looking(1)]).eval()
    served = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.members[0].features.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.members[0].features.modules())  # untouched
    for x in torch.rand(4, 1, 64, 64), torch.rand(1, 1, 64, 64):  # a batch, and one image (other kernels)
        with torch.inference_mode():
            expected, got = model.infer(x), served.infer(x)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.features, expected.features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.aligned, expected.aligned, rtol=1e-4, atol=1e-4)


def test_grad_cam_follows_the_evidence():
    """A network whose logit depends only on the left half must light up the left half."""
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    with torch.no_grad():
        net.head[1].weight.fill_(0.1)
    x = torch.zeros((1, 1, 64, 64))
    x[0, 0, 16:48, 4:28] = 1.0  # a bright patch on the left only
    model = Ensemble([net]).eval()
    cam = grad_cam(model, model.infer(x), 64)[0]
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0)
    assert cam[:, :32].sum() > cam[:, 32:].sum()


def test_an_ensemble_s_map_is_the_mean_of_its_members_maps():
    torch.manual_seed(1)
    members = [PneumoniaNet().eval() for _ in range(2)]
    x = torch.rand(1, 1, 64, 64)
    singles = [Ensemble([m]).eval() for m in members]
    raw = [grad_cam(single, single.infer(x), 64)[0] for single in singles]
    both_members = Ensemble(members).eval()
    both = grad_cam(both_members, both_members.infer(x), 64)[0]
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
    assert "saliency_png" in uploads.api(XRAY, saliency="1").get_json()  # a multipart field, as well as the query
    raw = uploads.client.post("/api/v1/predict?saliency=yes", data=XRAY, content_type="image/png").get_json()
    assert "saliency_png" in raw
    body = uploads.api(XRAY, query="?saliency=1").get_json()
    image = cv2.imdecode(np.frombuffer(base64.b64decode(body["saliency_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (256, 256, 3)


def test_the_map_s_colours_are_opencv_s_jet_colour_map():
    """``saliency_png`` looks colours up in a table made once: the same as ``cv2.applyColorMap``
    (over a black film the pixel is 0.55 x heat x the colour)."""
    from app.render import saliency_png

    heat = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))  # every column a level
    png = cv2.imdecode(np.frombuffer(saliency_png(np.zeros((64, 64), np.float32), heat, side=64), np.uint8),
                       cv2.IMREAD_COLOR)
    colour = cv2.applyColorMap(np.uint8(heat * 255), cv2.COLORMAP_JET).astype(np.float32) / 255
    expected = np.uint8(np.clip(0.55 * heat[:, :, None] * colour, 0, 1) * 255)
    np.testing.assert_array_equal(png, expected)
