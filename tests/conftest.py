"""Shared fixtures: the app and its client, upload actions, a tiny dataset folder, the real dataset."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import create_app
from model.settings import REPO_ROOT, data_dir
from tests.support.client import Uploads
from tests.support.images import make_adult_films, make_dataset


@pytest.fixture(scope="session", autouse=True)
def model_store(tmp_path_factory) -> Path:
    """Every test, and every server a test starts, uses a model store of its own."""
    root = tmp_path_factory.mktemp("model-store")
    os.environ["PNEUMONIA_MODEL_STORE"] = str(root)
    return root


@pytest.fixture(scope="session", autouse=True)
def generated_adult_films(tmp_path_factory) -> Path:
    """Training runs in tests fit their population gate on a few generated films, not the real ones."""
    root = make_adult_films(tmp_path_factory.mktemp("adult_cxr"))
    os.environ["ADULT_CXR_DATA"] = str(root)
    return root


@pytest.fixture(scope="session")
def app(model_store):
    """The app with the bundled model, as ``make serve`` starts it (shared: it holds no state)."""
    return create_app({"TESTING": True, "SECRET_KEY": "test"})


@pytest.fixture
def make_app():
    """An app with other settings: ``make_app(MAX_BATCH_FILES=5)``."""

    def make(**config):
        return create_app({"TESTING": True, "SECRET_KEY": "test", **config})

    return make


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def uploads(client) -> Uploads:
    return Uploads(client)


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "chest_xray")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real dataset; skipped where absent, but a failure under CI."""
    root = data_dir()
    if not (root / "test" / "PNEUMONIA").is_dir():
        message = f"real dataset not found at {root} (set CHEST_XRAY_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def real_adult_data() -> Path:
    """The real adult and lateral films (``../shared/data/adult_cxr``); skipped where absent, failed under CI."""
    root = REPO_ROOT.parent / "shared" / "data" / "adult_cxr"
    if not (root / "manifest.csv").is_file():
        message = f"adult films not found at {root}"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires them")
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def pediatric_film(real_data, app) -> bytes:
    """A real film of the test split (original size) that the bundled model accepts as in population."""
    predictor = app.extensions["model"].predictor
    for path in sorted((real_data / "test" / "PNEUMONIA").iterdir()):
        data = path.read_bytes()
        if predictor.predict(data).in_distribution:
            return data
    pytest.fail("no test-split film passes the population gate")
