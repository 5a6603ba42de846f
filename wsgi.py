"""WSGI entry point: ``gunicorn wsgi:app`` (settings in gunicorn.conf.py).

A bad checkpoint stops start-up with one line, not a traceback and not a
half-working server.
"""
import logging
import sys

from model import CheckpointError
from model.store import StoreError

logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")

from app import create_app  # noqa: E402
from app.config import ConfigError  # noqa: E402

try:
    app = create_app()
except (CheckpointError, StoreError, ConfigError) as exc:
    print(f"pneumonia-screening: cannot start: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(3) from None
