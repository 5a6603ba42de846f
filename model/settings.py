"""Paths and limits shared by the app, the training scripts, the tests and the benches.

Every default lives here, once; each can be overridden by an environment variable so
that a deployment or a CI run never has to edit code.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The bundled, trained checkpoint that the app loads out of the box.
DEFAULT_CHECKPOINT = REPO_ROOT / "model" / "weights" / "pneumonia_stn.pt"

#: The t-SNE artifact made from the bundled checkpoint (see training/tsne.py).
DEFAULT_TSNE_ARTIFACT = REPO_ROOT / "model" / "weights" / "tsne.npz"

#: The model store (model/store.py): versioned checkpoints and the serving pointer.
#: Flask's instance folder, ignored by git; in Docker, a volume.
DEFAULT_MODEL_STORE = REPO_ROOT / "instance" / "models"

#: Where preprocessed arrays are cached between training runs.
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "preprocessed"

#: More pixels than this is a decompression bomb or a scan, refused from the header.
MAX_IMAGE_PIXELS = 40_000_000

#: File endings of dataset images (scanning a split, serving thumbnails).
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def data_dir() -> Path:
    """The chest X-ray dataset folder (train|val|test/NORMAL|PNEUMONIA).

    One setting, ``CHEST_XRAY_DATA``, read by the tests, the benches and the app's
    analysis page; it defaults to the shared copy beside the checkout.
    """
    default = REPO_ROOT.parent / "shared" / "data" / "chest_xray"
    return Path(os.environ.get("CHEST_XRAY_DATA", default)).expanduser()


def model_store_dir() -> Path:
    """The model store folder: ``PNEUMONIA_MODEL_STORE``, read by the app and every admin command."""
    return Path(os.environ.get("PNEUMONIA_MODEL_STORE", DEFAULT_MODEL_STORE)).expanduser()


def adult_data_dir() -> Path:
    """Adult frontal and lateral films (``manifest.csv``) that the population gate learns to refuse.

    ``ADULT_CXR_DATA``; defaults to the shared copy beside the checkout.
    """
    default = REPO_ROOT.parent / "shared" / "data" / "adult_cxr"
    return Path(os.environ.get("ADULT_CXR_DATA", default)).expanduser()


def database_url() -> str:
    """The case record (``DATABASE_URL``): any SQLAlchemy URL; a SQLite file under ``instance/`` by default.
    Read by the app and by ``training.site report --cases``."""
    return os.environ.get("DATABASE_URL") or f"sqlite:///{REPO_ROOT / 'instance' / 'cases.sqlite3'}"


def torch_installed() -> bool:
    """Whether PyTorch can be imported here (asked without importing it): the training image has it, the
    serving image does not."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # an import system that refuses it
        return False
