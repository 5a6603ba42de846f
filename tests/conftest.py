"""Shared fixtures: the app and its client, upload actions, a tiny dataset folder, the real dataset."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

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
def case_database(tmp_path_factory) -> str:
    """Every test and every server a test starts records its cases in a database of its own."""
    url = f"sqlite:///{tmp_path_factory.mktemp('cases') / 'cases.sqlite3'}"
    os.environ["DATABASE_URL"] = url
    return url


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


@pytest.fixture(scope="session")
def postgresql_server():
    """A throwaway PostgreSQL server (Debian's binaries) for the case record's tests; each test
    makes a database of its own on it."""
    from harness.postgres import binaries, postgres

    if binaries() is None:
        message = "PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    with postgres() as server:
        yield server


# ---- the DICOM node's ---------------------------------------------------------------


@pytest.fixture(scope="session")
def served():
    """The bundled model as a DICOM node serves it (no store to watch)."""
    from app.serving import ServedModel
    from model import Predictor
    from model.settings import DEFAULT_CHECKPOINT

    return ServedModel(Predictor.from_path(DEFAULT_CHECKPOINT))


@pytest.fixture
def record(tmp_path):
    """A case record of the test's own."""
    from app.cases import CaseRecord

    record = CaseRecord(f"sqlite:///{tmp_path / 'cases.sqlite3'}")
    record.migrate()
    return record


@pytest.fixture(scope="session")
def pneumonia_pixels(real_data):
    """A real test-split film with pneumonia as 8-bit pixels, to build DICOM films from."""
    import cv2

    return cv2.imread(str(sorted((real_data / "test" / "PNEUMONIA").iterdir())[0]), cv2.IMREAD_GRAYSCALE)


# ---- the browser tests' server and headless Chromium ----------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="session")
def live_server():
    app = create_app({"SECRET_KEY": "browser-test"})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def browser_without_javascript(tmp_path_factory):
    """Chromium with JavaScript off from the start (so that <noscript> content is parsed)."""
    driver = chromium(tmp_path_factory, javascript=False)
    yield driver
    driver.quit()


def chromium(tmp_path_factory, javascript: bool = True):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "headless Chromium not installed (Debian packages chromium and chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver
