"""Shared fixtures: the app and its client, upload actions, a tiny dataset folder, the real dataset."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import create_app
from harness.images import make_adult_films, make_dataset
from model.settings import adult_data_dir, data_dir
from tests.client import Uploads


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


#: Read before ``generated_adult_films`` points ADULT_CXR_DATA at generated films.
REAL_ADULT_DATA = adult_data_dir()


def required_data(root: Path, marker: str, what: str) -> Path:
    """``root`` if ``root / marker`` exists; else a skip with the reason, or a failure under CI."""
    if not (root / marker).exists():
        message = f"{what} not found at {root}"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real dataset (``CHEST_XRAY_DATA``)."""
    return required_data(data_dir(), "test/PNEUMONIA", "real dataset (set CHEST_XRAY_DATA)")


@pytest.fixture(scope="session")
def real_adult_data() -> Path:
    """The real adult and lateral films (``ADULT_CXR_DATA``, default ``../shared/data/adult_cxr``)."""
    return required_data(REAL_ADULT_DATA, "manifest.csv", "adult films (set ADULT_CXR_DATA)")


@pytest.fixture(scope="session")
def pediatric_film(real_data, app) -> bytes:
    """A real film of the test split (original size) that the bundled model accepts as in population."""
    predictor = app.extensions["model"].predictor
    for path in sorted((real_data / "test" / "PNEUMONIA").iterdir()):
        data = path.read_bytes()
        if predictor.predict(data).in_distribution:
            return data
    pytest.fail("no test-split film passes the population gate")
