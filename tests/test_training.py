import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from filelock import FileLock

from model import Predictor, PreprocessParams, load_checkpoint
from model.network import NetworkConfig, PneumoniaNet
from model.population import PopulationHead
from training import data as data_module
from training import evaluate, train
from training.augment import augment, intensity_field, random_affine, then, tighter_framing
from training.data import DatasetError, load_split, patient_id, validation_split
from training.metrics import binary_metrics, threshold_for_sensitivity
from training.recipe import Recipe


def run_train(*argv):
    return train.main(train.get_args_parser().parse_args(list(argv)))


def test_dry_run_on_a_generated_folder_writes_a_loadable_checkpoint(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "ck.pt"
    code = run_train("--data", str(tiny_dataset), "--out", str(out), "--epochs", "2", "--dry-run",
                     "--cache-dir", str(tmp_path / "cache"), "--workers", "1")
    assert code == 0
    checkpoint = load_checkpoint(out, expected_preprocess=PreprocessParams())
    assert checkpoint.training_data["dry_run"] is True
    assert set(checkpoint.metrics) == {"validation", "test", "population_gate", "alignment", "robustness", "saliency"}
    assert isinstance(checkpoint.population_gate, PopulationHead)
    assert checkpoint.training_data["population_gate"]["kind"] == "head"
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["version"] == checkpoint.version
    printed = capsys.readouterr().out
    assert "sens" in printed and printed.rstrip().splitlines()[-1] == (
        "This is a dry run: it checks the pipeline and can never be served.")
    prediction = Predictor.from_path(out).predict(np.random.default_rng(0).random((100, 90)))
    assert 0 <= prediction.probability <= 1
    assert prediction.label is None if prediction.population_reasons else prediction.label in ("NORMAL", "PNEUMONIA")


def test_evaluate_prints_the_table(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "ck.pt"
    run_train("--data", str(tiny_dataset), "--out", str(out), "--epochs", "1", "--dry-run", "--workers", "1")
    capsys.readouterr()
    code = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(out), "--data", str(tiny_dataset), "--no-cache"]))
    assert code == 0
    printed = capsys.readouterr().out
    assert "test" in printed and "AUC" in printed and "24 images" in printed


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tiny_dataset, caplog):
    bad = tiny_dataset / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with caplog.at_level(logging.WARNING):
        split = load_split(tiny_dataset, "train", PreprocessParams(), None, workers=1, progress=False)
    assert "train/NORMAL/IM-9999-0001.jpeg" in caplog.text
    assert len(split) == 24 and "train/NORMAL/IM-9999-0001.jpeg" not in split.files


def test_cache_is_reused_and_keyed_by_parameters(tiny_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_split(tiny_dataset, "test", PreprocessParams(), cache, workers=1, progress=False)
    calls = []
    monkeypatch.setattr(data_module, "_preprocess_files", lambda *a, **k: calls.append(a) or [])
    second = load_split(tiny_dataset, "test", PreprocessParams(), cache, workers=1, progress=False)
    np.testing.assert_array_equal(first.images, second.images)
    assert calls == []  # served from the cache
    with pytest.raises(DatasetError):  # other parameters: a cache miss (and our stub decodes nothing)
        load_split(tiny_dataset, "test", PreprocessParams(geometry="center_crop"), cache, workers=1, progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("layout", ["missing", "empty_class", "no_split"])
def test_bad_layouts_stop_with_a_clear_message(tmp_path, layout, caplog):
    root = tmp_path / "data"
    if layout != "missing":
        (root / "train" / "NORMAL").mkdir(parents=True)
        (root / "train" / "PNEUMONIA").mkdir(parents=True)
    if layout == "empty_class":
        (root / "test" / "NORMAL").mkdir(parents=True)
        (root / "test" / "PNEUMONIA").mkdir(parents=True)
    out = tmp_path / "ck.pt"
    assert run_train("--data", str(root), "--out", str(out), "--dry-run") == 2
    assert any(word in caplog.text for word in ("not found", "holds no images", "no test/"))
    assert not out.exists()


def test_a_second_concurrent_run_is_refused(tiny_dataset, tmp_path, caplog):
    out = tmp_path / "ck.pt"
    with FileLock(str(out) + ".lock"):
        assert run_train("--data", str(tiny_dataset), "--out", str(out), "--dry-run") == 3
    assert "another training run" in caplog.text
    assert not out.exists()


def test_failed_run_leaves_the_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "ck.pt"
    run_train("--data", str(tiny_dataset), "--out", str(out), "--epochs", "1", "--dry-run", "--workers", "1")
    before = out.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(train, "evaluate", crash)
    with pytest.raises(RuntimeError):
        run_train("--data", str(tiny_dataset), "--out", str(out), "--epochs", "1", "--dry-run", "--workers", "1")
    assert out.read_bytes() == before


def test_patient_ids():
    assert patient_id("train/PNEUMONIA/person1261_virus_2147.jpeg") == "person1261"
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("NORMAL2-IM-0381-0001.jpeg") == "NORMAL2-IM-0381"
    assert patient_id("IM-0629-0001-0002.jpeg") == "IM-0629"


def test_validation_split_never_splits_a_patient():
    files = [f"person{i // 3}_bacteria_{i}.jpeg" for i in range(90)]
    files += [f"IM-{i // 2:04d}-{i:04d}.jpeg" for i in range(60)]
    labels = np.array([1] * 90 + [0] * 60)
    train_idx, val_idx = validation_split(files, labels, 0.2, seed=0)
    assert not {patient_id(files[i]) for i in train_idx} & {patient_id(files[i]) for i in val_idx}
    assert 0.1 < len(val_idx) / len(files) < 0.3
    assert 0.4 < labels[val_idx].mean() < 0.8  # stratified: close to the overall 0.6


def test_threshold_meets_the_target_sensitivity():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 200 + [0] * 100)
    probs = np.concatenate([rng.uniform(0.3, 1, 200), rng.uniform(0, 0.6, 100)])
    threshold = threshold_for_sensitivity(labels, probs, 0.98)
    metrics = binary_metrics(labels, probs, threshold)
    assert metrics["sensitivity"] >= 0.98
    assert binary_metrics(labels, probs, threshold + 1e-3)["sensitivity"] < 0.98  # the highest such threshold
    assert metrics["confusion"]["tp"] + metrics["confusion"]["fn"] == 200
    # the same films scored a little lower elsewhere (another memory layout or CPU) are still caught
    assert binary_metrics(labels, probs - 7e-7, threshold)["sensitivity"] >= 0.98


def test_cuda_without_a_gpu_is_a_clear_error(tiny_dataset, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "ck.pt"
    assert run_train("--data", str(tiny_dataset), "--out", str(out), "--dry-run", "--device", "cuda") == 2
    assert "no CUDA device" in caplog.text and not out.exists()


def test_weight_averaging_keeps_the_mean_of_the_last_epochs(tiny_dataset, tmp_path):
    out = tmp_path / "ck.pt"
    assert run_train("--data", str(tiny_dataset), "--out", str(out), "--epochs", "3", "--dry-run", "--workers", "1",
                     "--average-epochs", "2") == 0
    member = load_checkpoint(out).training_data["members"][0]
    assert member["averaged_epochs"] == 2
    assert 0 <= member["averaged_val_auc"] <= 1 or np.isnan(member["averaged_val_auc"])


def test_the_learning_rate_makes_one_cycle_with_the_transformer_at_its_share():
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW([{"params": [net.weight], "lr": 3e-3}, {"params": [net.bias], "lr": 3e-4}])
    schedule = train.learning_rate_schedule(optimizer, Recipe(lr=3e-3, stn_lr_scale=0.1, epochs=10), steps_per_epoch=4)
    rates = []
    for _ in range(40):
        optimizer.step()
        schedule.step()
        rates.append([group["lr"] for group in optimizer.param_groups])
    peak = max(range(40), key=lambda step: rates[step][0])
    assert rates[peak] == pytest.approx([3e-3, 3e-4], rel=0.01) and 4 <= peak <= 12  # a fifth of the way in
    assert rates[-2][0] < 1e-5  # and down to rest at the end


def test_the_recipe_builds_the_options_and_the_checkpoint_record():
    defaults = train.get_args_parser().parse_args([])
    assert Recipe.from_args(defaults) == Recipe()
    args = train.get_args_parser().parse_args(["--epochs", "4", "--no-stn", "--channels", "8", "16", "--dry-run",
                                               "--zoom-strength", "1.0"])
    recipe = Recipe.from_args(args)
    assert recipe == Recipe(epochs=4, stn=False, channels=(8, 16), dry_run=True, zoom_strength=1.0)
    assert recipe.record()["channels"] == [8, 16] and recipe.record()["epochs"] == 4
    assert set(recipe.record()) == {f.name for f in dataclasses.fields(Recipe)}
    assert (Recipe(consistency=0.1).views, Recipe(consistency=0.1, batch_size=64).films_per_batch) == (2, 32)
    assert (Recipe(consistency=0).views, Recipe(consistency=0, batch_size=64).films_per_batch) == (1, 64)
    for retired in ("--mixup", "--swa-lr", "--select", "--label-smoothing", "--population-gate"):
        with pytest.raises(SystemExit):
            train.get_args_parser().parse_args([retired, "1"])


def test_zoom_strength_widens_the_zoom_and_aspect_ranges_alone():
    x = torch.zeros(400, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0  # a bright square whose area the zoom changes
    narrow = augment(x, torch.Generator().manual_seed(0), strength=1.0).gt(0.5).float().mean(dim=(1, 2, 3))
    wide = augment(x, torch.Generator().manual_seed(0), strength=1.0, zoom_strength=3.0)
    wide = wide.gt(0.5).float().mean(dim=(1, 2, 3))
    assert wide.std() > 1.5 * narrow.std()


def test_the_intensity_field_is_smooth_centred_and_scales_with_its_amount():
    weak = intensity_field(2000, 64, 0.1, torch.Generator().manual_seed(0)).log()
    strong = intensity_field(2000, 64, 0.3, torch.Generator().manual_seed(0)).log()
    assert torch.allclose(strong, 3 * weak, atol=1e-5)  # the same surfaces, three times as steep
    assert abs(strong.mean().item()) < 0.01  # brightens as often as it darkens
    assert 0.05 < strong.std(dim=(1, 2, 3)).median().item() < 0.3
    step = max((strong[..., 1:] - strong[..., :-1]).abs().max(), (strong[..., 1:, :] - strong[..., :-1, :]).abs().max())
    assert step < 0.1  # smooth: no neighbouring pixels differ by more than ~10%


def test_the_intensity_field_draws_random_numbers_only_when_asked_for():
    x = torch.rand(4, 1, 32, 32)
    states = []
    for amount in (0.0, 0.3):
        generator = torch.Generator().manual_seed(0)
        augment(x, generator, 1.5, 2.5, bias_field=amount)
        states.append(generator.get_state())
    # off, the other augmentations' draws are those of the recipe without the option
    assert not torch.equal(states[0], states[1])
    generator = torch.Generator().manual_seed(0)
    flat = augment(torch.full((256, 1, 32, 32), 0.5), generator, 0.0, bias_field=0.3)
    halves = flat[..., :16].mean(dim=(1, 2, 3)) - flat[..., 16:].mean(dim=(1, 2, 3))
    assert halves.abs().median() > 0.02  # a flat film comes out brighter on one side


def test_a_tighter_framing_cuts_the_chosen_films_edges_within_the_amount():
    x = torch.full((400, 1, 64, 64), 0.5)
    x[:, :, :4] = 1.0  # a bright strip along the top edge (6% of the side)
    x[:, :, 9:11] = 0.0  # a dark line just past the most a cut may take (12% = 7.7 rows)
    chosen = torch.arange(400) % 2 == 0
    out, _ = tighter_framing(x, chosen, 0.12, torch.Generator().manual_seed(0))
    assert torch.equal(out[~chosen], x[~chosen])
    column = out[chosen, 0, :, 32]
    strip = column.gt(0.75).sum(dim=1)
    assert (strip == 0).float().mean() > 0.25 and (strip < 4).float().mean() > 0.8  # cut by a random share each
    assert column[:, :12].lt(0.25).any(dim=1).all()  # no cut goes past the amount
    assert column[:, 24:40].sub(0.5).abs().max() < 1e-5  # the middle of the film stays in the middle


def test_the_framing_cut_changes_normal_films_alone_and_is_off_by_default():
    images = torch.full((64, 1, 32, 32), 0.5)
    images[:, :, :3] = 1.0
    labels = torch.tensor([0, 1] * 32)
    assert train.framed(images, labels, Recipe(), torch.Generator()) == (images, None)
    out, _ = train.framed(images, labels, Recipe(framing_cut=0.2), torch.Generator().manual_seed(1))
    changed = (out != images).flatten(1).any(dim=1)
    assert not changed[labels == 1].any()
    assert 8 <= changed[labels == 0].sum() <= 24  # about half the normal films


@pytest.mark.parametrize("option", ["--bias-field", "--consistency"])
@pytest.mark.parametrize("value", ["-0.1", "abc", "nan", "inf"])
def test_an_amount_that_is_not_a_non_negative_number_is_a_clear_usage_error(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args([option, value])
    assert exit_info.value.code == 2
    assert f"{option}: must be a number, 0 (off) or more" in capsys.readouterr().err
    parsed = train.get_args_parser().parse_args([option, "0.3"])
    assert getattr(parsed, option[2:].replace("-", "_")) == 0.3


class Recorder(torch.nn.Module):
    """A one-weight network that keeps every batch it is given and the logits it returned."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(4.0))
        self.calls = []

    def forward(self, x):
        logits = self.weight * (x.mean(dim=(1, 2, 3)) - 0.5)
        self.calls.append((x.detach().clone(), logits.detach().clone()))
        return logits


def one_step(consistency: float, strength: float):
    """Train ``Recorder`` for one step on 8 films with a batch of 16 images; (loss, recorder, labels)."""
    images = np.linspace(0.1, 0.9, 8, dtype=np.float32)[:, None, None] * np.ones((8, 16, 16), np.float32)
    split = data_module.Split(images, np.array([0, 1] * 4), [f"f{i}" for i in range(8)])
    recipe = Recipe(batch_size=16 if consistency else 8, consistency=consistency, augment_strength=strength,
                    zoom_strength=strength, bias_field=0.0)
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    bar = train.tqdm(disable=True)
    loss = train.train_one_epoch(model, optimizer, schedule, split, recipe, torch.Generator().manual_seed(0), "cpu",
                                 torch.tensor(1.0), bar)
    return loss, model, torch.from_numpy(split.labels).float()


def test_consistency_trains_on_two_views_of_each_film_and_penalises_their_disagreement():
    _, plain, _ = one_step(consistency=1.0, strength=0.0)  # no augmentation: the two views are the film itself
    (x, _), = plain.calls
    assert x.shape[0] == 16 and torch.equal(x[:8], x[8:])  # the same 8 films, in the same order, twice
    films = torch.round((x[:8].mean(dim=(1, 2, 3)) - 0.1) / 0.8 * 7).long()  # which film is where (shuffled)
    assert sorted(films.tolist()) == list(range(8))
    loss, model, labels = one_step(consistency=1.0, strength=1.5)  # same seed: the same shuffle
    (x, logits), = model.calls
    assert not torch.allclose(x[:8], x[8:])  # each view drawn on its own
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[films].repeat(2))
    disagreement = (logits[:8] - logits[8:]).pow(2).mean()
    assert disagreement > 1e-4
    assert loss == pytest.approx((bce + disagreement).item(), rel=1e-5)
    off, model, labels = one_step(consistency=0.0, strength=1.5)  # off: one view of 8 films, no penalty
    (x, logits), = model.calls
    assert x.shape[0] == 8
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[films])
    assert off == pytest.approx(bce.item(), rel=1e-5)


def test_a_warp_then_another_samples_the_film_as_the_two_in_turn():
    axis = torch.linspace(-1, 1, 64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    film = (0.5 + 0.25 * torch.sin(6 * x) * torch.cos(5 * y)).expand(6, 1, 64, 64)
    generator = torch.Generator().manual_seed(0)
    cut_films, cut = tighter_framing(film, torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool), 0.12, generator)
    affine = random_affine(6, generator, 0.8, 0.8)

    def sample(images, theta):
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        return torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)

    in_turn, at_once = sample(cut_films, affine), sample(film, then(cut, affine))
    error = (in_turn - at_once)[..., 8:-8, 8:-8].abs().max()  # inside: what the borders leave alone
    assert error < 0.01  # interpolating twice against once
    assert (in_turn - sample(film, then(affine, cut)))[..., 8:-8, 8:-8].abs().max() > 5 * error  # order matters


def transformer_step(equivariance: float, strength: float) -> float:
    """The loss of one step (learning rate 0) of a fresh 16 px network with the transformer penalty."""
    images = np.random.default_rng(0).uniform(0, 1, (8, 16, 16)).astype(np.float32)
    split = data_module.Split(images, np.array([0, 1] * 4), [f"f{i}" for i in range(8)])
    recipe = Recipe(batch_size=16, augment_strength=strength, zoom_strength=strength, bias_field=0.0,
                    stn_equivariance=equivariance)
    torch.manual_seed(0)  # the same weights and dropout every call
    model = PneumoniaNet(NetworkConfig(input_size=16, channels=(4, 8)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return train.train_one_epoch(model, optimizer, schedule, split, recipe, torch.Generator().manual_seed(0), "cpu",
                                 torch.tensor(1.0), train.tqdm(disable=True))


def test_the_transformer_penalty_is_how_far_apart_the_two_views_look_on_the_film():
    # A fresh transformer is the identity, so each view looks where its own augmentation put it.
    assert transformer_step(1.0, strength=0.0) == transformer_step(0.0, strength=0.0)  # same warp: no penalty
    assert transformer_step(1.0, strength=1.5) - transformer_step(0.0, strength=1.5) > 0.01
    assert transformer_step(2.0, strength=1.5) - transformer_step(0.0, strength=1.5) == pytest.approx(
        2 * (transformer_step(1.0, strength=1.5) - transformer_step(0.0, strength=1.5)), rel=1e-4)


def test_the_transformer_penalty_without_two_views_is_a_clear_error(tmp_path, caplog):
    args = train.get_args_parser().parse_args(["--stn-equivariance", "1", "--consistency", "0",
                                               "--out", str(tmp_path / "model.pt")])
    assert train.main(args) == 2
    assert "--stn-equivariance compares the two views" in caplog.text
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written
