"""The spatial transformer's measured worth: its transform in words, the identity ablation,
the perturbed test films, and the model card's before/after grid."""
import json

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from app import create_app
from model import NetworkConfig, PneumoniaNet, load_checkpoint
from model.alignment import describe
from training import robustness, train
from training.robustness import perturb


def sample(image: np.ndarray, theta) -> np.ndarray:
    """What the network's grid_sample makes of ``image`` under ``theta``."""
    x = torch.from_numpy(image)[None, None]
    grid = F.affine_grid(torch.tensor(theta, dtype=torch.float32)[None], [1, 1, *image.shape], align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)[0, 0].numpy()


@pytest.fixture
def picture() -> np.ndarray:
    image = np.zeros((64, 64), np.float32)
    image[10:20, 30:50] = 1
    image[40:60, 5:12] = 0.5
    return image


@pytest.mark.parametrize("angle", [10.0, -15.0])
def test_rotation_is_reported_as_it_looks_on_screen(picture, angle):
    """A theta that turns the film as OpenCV turns it anticlockwise by ``angle`` reads ``angle``."""
    screen = cv2.warpAffine(picture, cv2.getRotationMatrix2D((31.5, 31.5), angle, 1.0), (64, 64))
    r = np.radians(angle)
    theta = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0]])
    assert np.abs(sample(picture, theta) - screen).mean() < 1e-3
    move = describe(theta)
    assert move.angle_deg == pytest.approx(angle) and move.zoom == pytest.approx(1)
    assert move.shift_x == pytest.approx(0, abs=1e-9) and move.movement > 0


def test_zoom_and_shift_are_what_happens_to_the_film(picture):
    theta = np.array([[0.8, 0, 0.2], [0, 0.8, 0]])  # reads a smaller window, right of centre
    move = describe(theta)
    assert move.zoom == pytest.approx(1.25) and move.angle_deg == pytest.approx(0)
    assert move.shift_x == pytest.approx(-0.125) and move.shift_y == pytest.approx(0)
    # The bright block (centre x = 39.5 px) lands where the shift and zoom say.
    ys, xs = np.nonzero(sample(picture, theta) > 0.9)
    expected = 31.5 + 64 * (move.shift_x + move.zoom * (39.5 - 31.5) / 64)
    assert xs.mean() == pytest.approx(expected, abs=0.6)


def test_identity_moves_nothing():
    move = describe(np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    assert move.movement == 0 and move.zoom == 1 and move.angle_deg == 0


def test_held_at_identity_the_network_sees_the_standardised_film():
    torch.manual_seed(0)
    net = PneumoniaNet(NetworkConfig(stn=False)).eval()
    x = torch.rand(3, 1, 64, 64)
    out = net.infer(x)
    assert torch.equal(out.theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))
    assert torch.allclose(out.aligned, PneumoniaNet.standardise(x))
    net.train()
    net(x).sum().backward()
    assert all(p.grad is None for p in net.stn.parameters())  # nothing in it is trained
    assert NetworkConfig.from_dict(NetworkConfig(stn=False).to_dict()).stn is False
    assert NetworkConfig.from_dict({k: v for k, v in NetworkConfig().to_dict().items() if k != "stn"}).stn is True


def test_perturbations_move_the_film_as_named(picture):
    images = picture[None]
    assert np.array_equal(perturb(images, 0.0, (0.0, 0.0), 1.0), images)
    shifted = perturb(images, 0.0, (0.125, 0.0), 1.0)[0]  # 8 px right
    assert np.nonzero(shifted > 0.9)[1].mean() == pytest.approx(39.5 + 8)
    turned = perturb(images, 15.0, (0.0, 0.0), 1.0)[0]
    screen = cv2.warpAffine(picture, cv2.getRotationMatrix2D((31.5, 31.5), 15.0, 1.0), (64, 64),
                            borderMode=cv2.BORDER_REPLICATE)
    assert np.allclose(turned, screen)
    bar = np.zeros((1, 64, 64), np.float32)
    bar[0, 22:42, 16:48] = 1  # 20 rows, 32 columns, centred
    taller = perturb(bar, *robustness.PERTURBATIONS["stretched 8% taller (as a film 8% wider)"])[0] > 0.5
    narrower = perturb(bar, *robustness.PERTURBATIONS["squeezed 8% narrower (as a film 8% wider)"])[0] > 0.5
    for stretched, rows, columns in ((taller, 20 * 1.08, 32), (narrower, 20, 32 / 1.08)):
        found = np.nonzero(stretched)
        assert np.ptp(found[0]) + 1 == pytest.approx(rows, abs=1)
        assert np.ptp(found[1]) + 1 == pytest.approx(columns, abs=1)
        assert found[0].mean() == pytest.approx(31.5, abs=0.5) and found[1].mean() == pytest.approx(31.5, abs=0.5)


def test_the_exposure_row_gives_each_film_its_own_smooth_field_the_same_for_every_checkpoint():
    flat = np.full((64, 32, 32), 0.5, np.float32)
    exposed = robustness.expose(flat)
    assert np.array_equal(exposed, robustness.expose(flat))  # a fixed draw: every checkpoint sees the same films
    halves = exposed[..., :16].mean(axis=(1, 2)) - exposed[..., 16:].mean(axis=(1, 2))
    assert np.median(np.abs(halves)) > 0.01  # brighter on one side
    assert len(np.unique(exposed.reshape(64, -1), axis=0)) == 64  # each film its own field
    assert np.median(np.abs(exposed / 0.5 - 1)) < 0.15  # mild: typically within ±9%
    assert exposed.dtype == np.float32 and exposed.min() >= 0 and exposed.max() <= 1


@pytest.fixture
def ablation_run(tiny_dataset, tmp_path):
    """A dry run with the transform held at identity, and one with the STN."""
    paths = {}
    for name, extra in (("stn", []), ("identity", ["--no-stn"])):
        paths[name] = tmp_path / f"{name}.pt"
        args = ["--data", str(tiny_dataset), "--out", str(paths[name]), "--epochs", "1", "--dry-run", "--workers",
                "1", "--cache-dir", str(tmp_path / "cache"), "--adult-data", str(tmp_path / "none"), *extra]
        assert train.main(train.get_args_parser().parse_args(args)) == 0
    return tiny_dataset, paths


def test_training_records_alignment_and_robustness_and_the_ablation_flag(ablation_run):
    _, paths = ablation_run
    stn, identity = load_checkpoint(paths["stn"]), load_checkpoint(paths["identity"])
    assert stn.network.stn and not identity.network.stn
    assert identity.training_data["recipe"]["stn"] is False
    assert set(stn.metrics["robustness"]) == set(robustness.CONDITIONS)
    alignment = stn.metrics["alignment"]
    assert alignment["films"] == stn.training_data["test"]["images"] and len(alignment["largest"]) == 8
    moves = [film["movement"] for film in alignment["largest"]]
    assert moves == sorted(moves, reverse=True)
    assert all(film["movement"] == 0 for film in identity.metrics["alignment"]["largest"])
    assert identity.metrics["alignment"]["movement_std"] == 0


def test_robustness_prints_a_table_for_both_arms(ablation_run, tmp_path, capsys):
    data, paths = ablation_run
    out = tmp_path / "figures.json"
    args = ["--checkpoint", str(paths["stn"]), str(paths["identity"]), "--data", str(data),
            "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert robustness.main(robustness.get_args_parser().parse_args(args)) == 0
    printed = capsys.readouterr().out
    assert "| rotated -15° |" in printed and "| exposure field, exp(0.1 f) |" in printed
    assert "| stn | identity |" in printed
    assert "normal films' mean logit change on the test split" in printed
    figures = json.loads(out.read_text())
    assert set(figures["stn"]["normal_logit_shift"]) == set(robustness.CONDITIONS)
    assert figures["stn"]["normal_logit_shift"]["as is"] == pytest.approx(0, abs=1e-5)
    assert figures["stn"]["films"] == figures["identity"]["films"] == 24  # the test split


def test_robustness_on_each_checkpoints_own_validation_films(ablation_run, tmp_path, capsys):
    data, paths = ablation_run
    args = ["--checkpoint", str(paths["stn"]), "--data", str(data), "--split", "validation",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "figures.json")]
    assert robustness.main(robustness.get_args_parser().parse_args(args)) == 0
    assert "AUC on the validation split" in capsys.readouterr().out
    checkpoint = load_checkpoint(paths["stn"])
    films = json.loads((tmp_path / "figures.json").read_text())["stn"]["films"]
    assert films == checkpoint.training_data["validation"]["images"]


def test_model_card_shows_the_films_moved_most_before_and_after(ablation_run):
    data, paths = ablation_run
    checkpoint = load_checkpoint(paths["stn"])
    html = create_app({"TESTING": True, "SECRET_KEY": "t", "CHECKPOINT_PATH": str(paths["stn"]),
                       "DATASET_DIR": str(data)}).test_client().get("/model").get_data(as_text=True)
    assert 'id="alignment-grid"' in html
    assert html.count("before alignment\"") == 8 and html.count("after alignment\"") == 8
    assert html.count("data:image/png;base64,") >= 16
    assert 'id="robustness-table"' in html and "rotated +15°" in html
    first = checkpoint.metrics["alignment"]["largest"][0]
    assert f"{first['angle_deg']:+.1f}°" in html


def test_model_card_without_the_dataset_lists_the_films_and_says_why(ablation_run, tmp_path):
    _, paths = ablation_run
    html = create_app({"TESTING": True, "SECRET_KEY": "t", "CHECKPOINT_PATH": str(paths["stn"]),
                       "DATASET_DIR": str(tmp_path / "absent")}).test_client().get("/model").get_data(as_text=True)
    assert 'id="alignment-grid"' not in html and 'id="alignment-table"' in html


def test_model_card_says_when_every_film_gets_the_same_warp(ablation_run):
    _, paths = ablation_run
    html = create_app({"TESTING": True, "SECRET_KEY": "t", "CHECKPOINT_PATH": str(paths["identity"])}
                      ).test_client().get("/model").get_data(as_text=True)
    assert 'id="fixed-warp"' in html and "same warp to every film" in html
    assert "pictures need the dataset folder" in html
    assert load_checkpoint(paths["stn"]).metrics["alignment"]["largest"][0]["file"] in html


def test_the_transformer_learns_at_its_own_rate(tiny_dataset, tmp_path):
    """--stn-lr-scale 0 leaves the spatial transformer as initialised while the CNN learns."""
    out = tmp_path / "frozen.pt"
    args = ["--data", str(tiny_dataset), "--out", str(out), "--epochs", "2", "--dry-run", "--workers", "1",
            "--adult-data", str(tmp_path / "none"), "--stn-lr-scale", "0"]
    assert train.main(train.get_args_parser().parse_args(args)) == 0
    trained = load_checkpoint(out)
    torch.manual_seed(0)  # the run's seed: the same initial weights
    initial = PneumoniaNet(NetworkConfig()).state_dict()
    state = trained.state_dicts[0]
    stn = [k for k in state if k.startswith("stn.")]
    assert stn and all(torch.equal(state[k], initial[k]) for k in stn)
    assert not torch.equal(state["features.0.0.weight"], initial["features.0.0.weight"])
    member = trained.training_data["members"][0]
    assert trained.training_data["recipe"]["stn_lr_scale"] == 0
    assert member["stn_theta_spread"] == pytest.approx(0, abs=1e-6)  # identity for every film


def test_a_file_from_out_gets_its_population_gate_as_a_store_candidate(ablation_run, tmp_path):
    """training.population --checkpoint: how an experiment becomes a candidate (the bundled model's route)."""
    from model.population import PopulationHead
    from model.store import ModelStore
    from training import population

    data, paths = ablation_run
    store = tmp_path / "store"
    args = ["--checkpoint", str(paths["stn"]), "--data", str(data), "--store", str(store),
            "--cache-dir", str(tmp_path / "cache"), "--workers", "1"]
    assert population.main(population.get_args_parser().parse_args(args)) == 0
    source = load_checkpoint(paths["stn"])
    candidates = [ModelStore(store).load(row["version"]) for row in ModelStore(store).versions()]
    refits = [c for c in candidates if c.training_data.get("population_gate", {}).get("refit_of") == source.version]
    assert len(refits) == 1 and type(refits[0].population_gate) is PopulationHead
    assert refits[0].state_dicts[0]["head.1.weight"].equal(source.state_dicts[0]["head.1.weight"])
    assert {"alignment", "robustness", "population_gate"} <= set(refits[0].metrics)
    assert ModelStore(store).serving_version() != refits[0].version  # a candidate, not served
