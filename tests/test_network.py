import pytest
import torch

from model import Ensemble, NetworkConfig, PneumoniaNet, for_inference
from model.network import OneChannelConv


def test_stn_starts_as_the_identity():
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    x = torch.rand(3, 1, 64, 64)
    out = net.infer(x)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3)
    torch.testing.assert_close(out.theta, identity)
    torch.testing.assert_close(out.aligned, PneumoniaNet.standardise(x), atol=1e-5, rtol=1e-5)


def test_shapes_of_logits_features_and_aligned_image():
    net = PneumoniaNet(NetworkConfig(channels=(8, 16, 32, 48))).eval()
    out = net.infer(torch.rand(5, 1, 64, 64))
    assert out.logits.shape == (5,)
    assert out.features.shape == (5, 48)
    assert out.aligned.shape == (5, 1, 64, 64)


def test_the_stn_learns_a_shift():
    """The localisation net gets gradients: a step moves theta away from the identity."""
    torch.manual_seed(0)
    net = PneumoniaNet()
    optimizer = torch.optim.SGD(net.stn.parameters(), lr=0.1)
    loss = net.infer(torch.rand(4, 1, 64, 64)).aligned[:, :, :, :32].mean()
    loss.backward()
    optimizer.step()
    theta = net.eval().infer(torch.rand(1, 1, 64, 64)).theta
    assert not torch.allclose(theta, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))


def test_ensemble_averages_member_logits():
    torch.manual_seed(0)
    a, b = PneumoniaNet().eval(), PneumoniaNet().eval()
    x = torch.rand(2, 1, 64, 64)
    ensemble = Ensemble([a, b]).eval()
    torch.testing.assert_close(ensemble(x), (a(x) + b(x)) / 2)
    assert ensemble.infer(x).features.shape == (2, 256)


def test_standardise_removes_exposure():
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(PneumoniaNet.standardise(0.5 * x + 0.2), PneumoniaNet.standardise(x), atol=1e-4, rtol=1e-4)


def test_a_one_channel_convolution_runs_as_a_matrix_product_with_the_same_output():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 8, 3, padding=1)
    fast = OneChannelConv(conv)
    with torch.inference_mode():
        for x in torch.rand(1, 1, 64, 48), torch.rand(3, 1, 64, 48):  # one image (the product), a batch (the conv)
            torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-5)
        assert fast(torch.rand(1, 1, 64, 48)).is_contiguous(memory_format=torch.channels_last)
    for other in (torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"),
                  torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.Conv2d(1, 8, 3)):
        with pytest.raises(ValueError):
            OneChannelConv(other)


def test_the_served_network_runs_its_one_channel_convolutions_so():
    served = for_inference(Ensemble([PneumoniaNet()]))
    assert sum(isinstance(m, OneChannelConv) for m in served.modules()) == 2  # the transformer's, the classifier's
    wrapped = {id(m.conv) for m in served.modules() if isinstance(m, OneChannelConv)}
    assert all(id(m) in wrapped for m in served.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 1)
