"""App settings: defaults that run out of the box, each overridable by the environment.

The variables, their defaults and what they set are listed once, in the README's
"Settings" table; the paths' defaults live in ``model/settings.py``.
"""
from __future__ import annotations

import os

from model.settings import MAX_IMAGE_PIXELS, data_dir, database_url, model_store_dir


class ConfigError(ValueError):
    """A setting the app cannot run with; the message names it."""


def clinic_prevalence() -> float | None:
    """``CLINIC_PREVALENCE``: the share of films with pneumonia the clinic expects (0.2 for 20%),
    or unset; displayed probabilities are adjusted to it (app/pages.py)."""
    text = os.environ.get("CLINIC_PREVALENCE", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise ConfigError(f"CLINIC_PREVALENCE must be a fraction between 0 and 1 (0.2 for 20%), not {text[:20]!r}")
    return value


def request_budget_s() -> float:
    """Seconds a request may spend reading files (``REQUEST_BUDGET_S``); read by gunicorn.conf.py too."""
    return float(os.environ.get("REQUEST_BUDGET_S", "20"))


def from_environment() -> dict:
    """Flask config keys read from the environment (or defaults)."""
    env = os.environ
    return {
        "MODEL_STORE": str(model_store_dir()),
        "CHECKPOINT_PATH": env.get("PNEUMONIA_CHECKPOINT") or None,
        "TSNE_ARTIFACT": env.get("PNEUMONIA_TSNE_ARTIFACT") or None,
        "DATASET_DIR": str(data_dir()),
        "MAX_CONTENT_LENGTH": int(float(env.get("MAX_UPLOAD_MB", "20")) * 1024 * 1024),
        "MAX_IMAGE_PIXELS": int(float(env.get("MAX_IMAGE_MEGAPIXELS", MAX_IMAGE_PIXELS / 1e6)) * 1_000_000),
        "MAX_BATCH_FILES": int(env.get("MAX_BATCH_FILES", "20")),
        # What one request may spend reading its files (a batch's files together); gunicorn's
        # graceful shutdown waits longer than REQUEST_BUDGET_S (gunicorn.conf.py).
        "MAX_REQUEST_PIXELS": int(float(env.get("MAX_REQUEST_MEGAPIXELS", "120")) * 1_000_000),
        "REQUEST_BUDGET_S": request_budget_s(),
        "SECRET_KEY": env.get("SECRET_KEY"),
        # The case record (app/cases.py): a SQLite file by default, any SQLAlchemy URL.
        "DATABASE_URL": database_url(),
        # A header the hospital's authenticating proxy sets to the user's name; unset: no user is recorded.
        "TRUSTED_USER_HEADER": env.get("TRUSTED_USER_HEADER") or None,
        "CLINIC_PREVALENCE": clinic_prevalence(),
        "SESSION_COOKIE_SAMESITE": "Lax",  # and Secure whenever the request came over HTTPS (security.py)
        "WTF_CSRF_TIME_LIMIT": None,  # a clinician may leave the upload page open all shift
    }
