"""Shared fixtures: the app and its client, upload actions, a tiny dataset folder, the real dataset."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import create_app
from model.settings import data_dir
from tests.support.client import Uploads
from tests.support.images import make_dataset


@pytest.fixture(scope="session", autouse=True)
def model_store(tmp_path_factory) -> Path:
    """Every test, and every server a test starts, uses a model store of its own."""
    root = tmp_path_factory.mktemp("model-store")
    os.environ["PNEUMONIA_MODEL_STORE"] = str(root)
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
