import copy

import pytest
import torch

from model import Ensemble, NetworkConfig, PneumoniaNet, for_inference, inference
from model.inference import CachedGridTransformer, DirectSequential, FusedConvReLU, affine_grid, to_channels_last


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


@pytest.mark.parametrize("size", [(64, 64), (17, 30)])
def test_the_cached_affine_grid_is_torch_s(size):
    torch.manual_seed(0)
    theta = torch.eye(2, 3) + 0.3 * torch.randn(3, 2, 3)
    reference = torch.nn.functional.affine_grid(theta, [3, 1, *size], align_corners=False)
    for _ in range(2):  # built, then taken from the cache
        torch.testing.assert_close(affine_grid(theta, *size), reference, rtol=0, atol=1e-6)


def test_the_transformer_samples_the_same_with_and_without_autograd():
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    torch.nn.init.normal_(net.stn.regressor[-1].weight, std=0.05)  # away from the identity
    stn, served = net.stn, for_inference(Ensemble([net])).members[0].stn
    assert type(served) is CachedGridTransformer
    x = torch.rand(2, 1, 64, 64)
    trained_way, theta = stn(x)
    with torch.inference_mode():
        served_way, served_theta = served(x)
    assert not torch.allclose(theta, torch.eye(2, 3).expand(2, 2, 3), atol=1e-3)
    torch.testing.assert_close(served_theta, theta.detach())
    torch.testing.assert_close(served_way, trained_way.detach(), rtol=0, atol=1e-5)


def test_ensemble_averages_member_logits():
    torch.manual_seed(0)
    a, b = PneumoniaNet().eval(), PneumoniaNet().eval()
    x = torch.rand(2, 1, 64, 64)
    ensemble = Ensemble([a, b]).eval()
    torch.testing.assert_close(ensemble(x), (a(x) + b(x)) / 2)
    assert ensemble.infer(x).features.shape == (2, 256)


def test_standardise_removes_exposure():
    x = torch.rand(2, 1, 64, 64)
    exposed = PneumoniaNet.standardise(0.5 * x + 0.2)
    torch.testing.assert_close(exposed, PneumoniaNet.standardise(x), atol=1e-4, rtol=1e-4)


needs_onednn = pytest.mark.skipif(not FusedConvReLU.available(),
                                  reason="this torch build has no oneDNN convolution operator")


@needs_onednn
@pytest.mark.parametrize("channels, groups", [(1, 1), (8, 1), (8, 2)])  # a first convolution, plain, grouped
def test_a_fused_convolution_gives_the_convolution_and_its_relu(channels, groups):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 16, 3, padding=1, groups=groups).eval()
    fused = FusedConvReLU(conv)
    with torch.inference_mode():
        for x in torch.randn(1, channels, 32, 24), torch.randn(3, channels, 32, 24), torch.randn(1, channels, 32, 24):
            x = x.contiguous(memory_format=torch.channels_last)
            out = fused(x)
            torch.testing.assert_close(out, torch.relu(conv(x)), rtol=1e-4, atol=1e-4)
            assert (out >= 0).all()
        threads = torch.get_num_threads()
        # once a shape
        assert list(fused.packed) == [((1, channels, 32, 24), threads), ((3, channels, 32, 24), threads)]
        copied = copy.deepcopy(fused)  # the packed weights stay behind and are packed again
        assert copied.packed == {}
        torch.testing.assert_close(copied(x[:1]), fused(x[:1]))


@needs_onednn
def test_weights_are_packed_again_for_another_thread_count():
    # A gunicorn master checks the model under all the cores' threads, then each worker
    # sets one: weights laid out for two threads were reordered on every call under one.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).eval()
    fused = FusedConvReLU(conv)
    x = torch.randn(1, 8, 32, 24).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            two = fused(x)
            torch.set_num_threads(1)
            one = fused(x)
    finally:
        torch.set_num_threads(threads)
    assert sorted(fused.packed) == [((1, 8, 32, 24), 1), ((1, 8, 32, 24), 2)]
    torch.testing.assert_close(one, two)


@needs_onednn
def test_the_packed_layouts_are_bounded():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).eval()
    fused = FusedConvReLU(conv)
    with torch.inference_mode():
        for batch in range(1, FusedConvReLU.MAX_PACKED + 3):  # a script or a client sending every batch size
            x = torch.randn(batch, 4, 16, 16).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(fused(x), torch.relu(conv(x)), rtol=1e-4, atol=1e-4)
            assert 1 <= len(fused.packed) <= FusedConvReLU.MAX_PACKED
    assert ((FusedConvReLU.MAX_PACKED + 2, 4, 16, 16), torch.get_num_threads()) in fused.packed


@needs_onednn
def test_the_served_network_fuses_each_convolution_followed_by_a_relu():
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    served = for_inference(Ensemble([net]))
    fused = [m for m in served.modules() if isinstance(m, FusedConvReLU)]
    assert len(fused) == 11  # the classifier's 8 convolutions and the transformer's 3
    wrapped = {id(m.conv) for m in fused}
    assert all(id(m) in wrapped for m in served.modules() if isinstance(m, torch.nn.Conv2d))
    member = served.members[0]  # the ReLUs went into the convolutions, leaving no placeholder behind
    left = [m for part in (member.features, member.stn.localisation) for m in part.modules()]
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.Identity)) for m in left)
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        reference, out = net.infer(x), served.infer(x)
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.activations[0], reference.activations[0], rtol=1e-4, atol=1e-4)


def test_inference_sequences_skip_module_calls_and_compute_the_same():
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    served = for_inference(Ensemble([net]))
    sequences = [m for m in served.modules() if isinstance(m, torch.nn.Sequential)]
    assert sequences and all(type(m) is DirectSequential for m in sequences)
    assert not any(type(m) is DirectSequential for m in net.modules())  # the trained network is untouched
    calls = []
    served.members[0].features[0][-1].register_forward_hook(lambda *args: calls.append(args))
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(served.infer(x).logits, net.infer(x).logits, rtol=1e-4, atol=1e-4)
    assert not calls  # no Module.__call__ inside a sequence: what the copy saves


def test_without_the_onednn_operator_the_plain_convolutions_stay(monkeypatch):
    monkeypatch.setattr(FusedConvReLU, "available", staticmethod(lambda: False))
    layers = to_channels_last(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()))
    assert type(layers[0]) is torch.nn.Conv2d and isinstance(layers[1], torch.nn.ReLU)


@pytest.fixture
def hidden_onednn(monkeypatch):
    """The private operators looked up under names no torch build has: as a build without them."""
    monkeypatch.setattr(inference, "ONEDNN_OPS", ("_no_such_convolution", "_no_such_reorder"))
    inference.lookup_onednn_ops.cache_clear()
    yield
    inference.lookup_onednn_ops.cache_clear()


def test_with_the_onednn_operators_hidden_the_served_network_runs_plain_pytorch(hidden_onednn):
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    served = for_inference(Ensemble([net]))
    assert inference.onednn_ops() is None
    assert not any(isinstance(m, FusedConvReLU) for m in served.modules())
    assert any(isinstance(m, torch.nn.ReLU) for m in served.modules())  # the plain layers stay
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(served.infer(x).logits, net.infer(x).logits, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_fused_convolution_whose_operator_fails_falls_back_to_plain_pytorch(monkeypatch, caplog):
    torch.manual_seed(0)
    net = PneumoniaNet().eval()
    served = for_inference(Ensemble([net]))
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        expected = served.infer(x).logits

    def broken(*args):
        raise RuntimeError("no kernel for these arguments")

    monkeypatch.setattr(inference, "lookup_onednn_ops", lambda: (broken, broken))
    monkeypatch.setattr(inference, "_disabled", False)
    with torch.inference_mode():
        torch.testing.assert_close(served.infer(x).logits, expected, rtol=1e-4, atol=1e-4)
    assert inference.onednn_ops() is None  # plain from then on, and said once
    assert caplog.text.count("running plain convolutions from now on") == 1


def test_a_convolution_without_a_relu_after_it_is_not_fused():
    layers = to_channels_last(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.MaxPool2d(2)))
    assert type(layers[0]) is torch.nn.Conv2d


def test_the_taps_are_the_middle_blocks_averaged_over_a_grid_in_the_trained_and_the_served_network():
    """What the population head reads: blocks 1 and 2 (0-based), each 2 x 2-averaged, every member's."""
    torch.manual_seed(0)
    config = NetworkConfig(channels=(8, 16, 24, 32))
    members = [PneumoniaNet(config).eval() for _ in range(2)]
    x = torch.rand(3, 1, 64, 64)
    expected = []
    with torch.no_grad():
        for net in members:
            aligned, _ = net.stn(net.standardise(x))
            first = net.features[1](net.features[0](aligned))  # (3, 16, 16, 16)
            second = net.features[2](first)  # (3, 24, 8, 8)
            for block in (first, second):
                h, w = block.shape[-2:]  # each of the four cells' mean, channel by channel
                cells = block.reshape(3, block.shape[1], 2, h // 2, 2, w // 2).mean(dim=(3, 5))
                expected.append(cells.flatten(1))
        expected = torch.cat(expected, dim=1)
        trained = Ensemble(members).infer(x).taps
        served = for_inference(Ensemble(members)).infer(x).taps
    assert config.tap_width == 4 * (16 + 24) and trained.shape == (3, 2 * config.tap_width)
    torch.testing.assert_close(trained, expected)
    torch.testing.assert_close(served, expected, atol=1e-4, rtol=1e-4)
