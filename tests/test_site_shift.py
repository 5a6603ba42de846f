"""Films as other sites export them: frames trimmed, processing learned, the suite that measures both."""
import dataclasses
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from harness.images import encode, synthetic_xray
from model import Predictor, PreprocessParams, load_checkpoint, preprocess
from model.intended_use import polarity
from model.settings import DEFAULT_CHECKPOINT
from model.store import ModelStore
from training import film_changes as changes
from training import site_shift, train
from training.data import load_split
from training.processing import FAMILIES, process, rng_for

FILM = synthetic_xray(330, 460, seed=11)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_a_frame_or_letterbox_leaves_the_model_input_as_it_was(value):
    framed = cv2.copyMakeBorder(FILM, 20, 20, 20, 20, cv2.BORDER_CONSTANT, value=value)
    boxed = cv2.copyMakeBorder(FILM, 65, 65, 0, 0, cv2.BORDER_CONSTANT, value=value)  # padded to a square
    for film in (framed, boxed):
        np.testing.assert_array_equal(preprocess(film), preprocess(FILM))
        assert np.abs(preprocess(film, PreprocessParams(frame="keep")) - preprocess(FILM)).mean() > 0.01


def test_a_version_2_record_reads_as_keeping_the_frame():
    old = {**PreprocessParams().to_dict(), "version": 2}
    del old["frame"]
    assert PreprocessParams.from_dict(old) == PreprocessParams(frame="keep")
    with pytest.raises(ValueError):
        PreprocessParams.from_dict({**old, "frame": "trim"})  # version 2 never trimmed


def test_processing_draws_the_same_copy_of_a_film_every_time_and_another_for_each_copy():
    first = process(FILM, rng_for("train/NORMAL/a.jpeg", 0, 0))
    assert first.dtype == np.uint8 and first.shape == FILM.shape
    np.testing.assert_array_equal(first, process(FILM, rng_for("train/NORMAL/a.jpeg", 0, 0)))
    copies = [process(FILM, rng_for("train/NORMAL/a.jpeg", 0, c)) for c in range(4)]
    assert len({c.tobytes() for c in copies}) == 4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_changes_the_film_and_keeps_its_size(family):
    out = FAMILIES[family](FILM, np.random.default_rng(0))
    assert out.shape == FILM.shape and out.dtype == np.uint8 and not np.array_equal(out, FILM)


def test_processed_copies_are_made_once_cached_and_follow_a_subset(tiny_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    split = load_split(tiny_dataset, "train", PreprocessParams(), cache, workers=1, progress=False, processed=2)
    assert split.processed.shape == (2, *split.images.shape)
    assert not np.allclose(split.processed[0], split.images)
    again = load_split(tiny_dataset, "train", PreprocessParams(), cache, workers=1, progress=False, processed=2)
    np.testing.assert_array_equal(again.processed, split.processed)  # from the cache, the same draws
    part = split.subset(np.array([3, 1]))
    np.testing.assert_array_equal(part.processed[1, 0], split.processed[1, 3])
    images, labels = part.with_processed
    assert images.shape[0] == 6 and list(labels) == list(part.labels) * 3


def test_a_view_takes_processed_copies_at_the_share_asked_for():
    images = torch.zeros(200, 1, 4, 4)
    processed = torch.stack([torch.full((200, 4, 4), 1.0), torch.full((200, 4, 4), 2.0)])
    index = torch.arange(0, 200, 2)
    generator = torch.Generator().manual_seed(0)
    assert train.view_of(images, processed, index, 0.0, generator).abs().sum() == 0
    everyone = train.view_of(images, processed, index, 1.0, generator)[:, 0, 0, 0]
    assert set(everyone.tolist()) == {1.0, 2.0}  # each film one of its copies
    half = train.view_of(images, processed, index, 0.5, generator)[:, 0, 0, 0]
    assert 0.3 < (half > 0).float().mean() < 0.7
    assert images.abs().sum() == 0  # the films as they are stay untouched


def test_the_suite_measures_every_row_and_counts_duplicates_once(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "ck.pt"
    assert train.main(train.get_args_parser().parse_args(
        ["--data", str(tiny_dataset), "--out", str(out), "--epochs", "1", "--dry-run", "--workers", "1",
         "--cache-dir", str(tmp_path / "cache")])) == 0
    test_normal = tiny_dataset / "test" / "NORMAL"
    first = sorted(test_normal.iterdir())[0]
    shutil.copy(first, test_normal / "IM-9999-0001.jpeg")  # the same pixels under another name
    capsys.readouterr()
    args = site_shift.get_args_parser().parse_args(
        ["--checkpoint", str(out), "--data", str(tiny_dataset), "--workers", "1", "--record"])
    assert site_shift.main(args) == 0
    printed = capsys.readouterr().out
    assert "(24 films, duplicates counted once)" in printed
    for row in site_shift.CHANGES:
        assert f"| {row} |" in printed
    recorded = load_checkpoint(out).metrics["site_shift"]
    assert set(recorded) == set(site_shift.CHANGES) and recorded["as is"]["decisions_changed"] == 0
    assert {"auc", "sensitivity", "false_positive_rate"} == set(recorded["as is"]["intervals"])


def test_every_change_of_the_suite_keeps_a_film_readable():
    film = synthetic_xray(400, 520, seed=5)
    for name, change in site_shift.CHANGES.items():
        changed = change(film)
        assert changed.dtype == np.uint8 and changed.ndim == 2, name
        assert preprocess(changed).shape == (64, 64), name


def test_native_resolution_changes_no_decision(real_data):
    """The same film at 800 or 2,500 px (the longer side) gets the same decision: image size, which
    predicts this test split's label, tells the model nothing."""
    predictor = Predictor(load_checkpoint(DEFAULT_CHECKPOINT))
    test = real_data / "test"
    films = sorted((test / "NORMAL").iterdir())[:10] + sorted((test / "PNEUMONIA").iterdir())[:10]
    for path in films:
        film = site_shift.read_film(path)
        decisions = {predictor.predict(encode(changes.resample(film, side), ".png")).label
                     for side in (800, 2500)}
        decisions.add(predictor.predict(path.read_bytes()).label)
        assert len(decisions) == 1, path.name


def test_an_inverted_film_is_refused_never_scored(real_data):
    predictor = Predictor(load_checkpoint(DEFAULT_CHECKPOINT))
    test = real_data / "test"
    films = sorted((test / "PNEUMONIA").iterdir())[:6] + sorted((test / "NORMAL").iterdir())[:6]
    inputs = np.stack([predictor.preprocess(path.read_bytes()) for path in films])
    assert (polarity(inputs) > 0).all() and (polarity(1 - inputs) < 0).all()
    for path in films:
        inverted = encode(changes.invert(site_shift.read_film(path)), ".png")
        prediction = predictor.predict(inverted)
        assert prediction.label is None and prediction.ood_score > 1
        assert prediction.population_reasons[0].check == "image"


def test_a_store_serving_a_model_of_other_preprocessing_upgrades_to_the_bundled_one(tmp_path, make_app, caplog):
    """After a code update that changes the preprocessing, the old serving version cannot serve:
    the server starts with this code's bundled model and the store's history says why."""
    store = ModelStore(tmp_path / "store")
    old = load_checkpoint(DEFAULT_CHECKPOINT)
    old = dataclasses.replace(old, preprocess=PreprocessParams(frame="keep"), version="stn-cnn-20200101-0ld0ld00")
    store.add(old)
    store.pointer_path.write_text(json.dumps({"serving": old.version, "history": []}))  # as an older release left it
    app = make_app(MODEL_STORE=str(store.root))
    assert app.test_client().get("/healthz").get_json()["model_version"] == load_checkpoint(DEFAULT_CHECKPOINT).version
    last = store.read_pointer().history[-1]
    assert last["action"] == "upgrade" and old.version in last["reason"]
    assert "cannot serve with this code's preprocessing" in caplog.text


def test_the_model_card_shows_the_site_shift_table(client):
    html = client.get("/model").get_data(as_text=True)
    assert 'id="site-shift-table"' in html
    for row in ("black border, 5%", "CLAHE, clip 2, 8 x 8 tiles", "inverted polarity"):
        assert f"<td>{row}</td>" in html
    assert "bootstrap 95% intervals" in html
