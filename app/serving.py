"""The model this process serves: loaded once at start-up, shared by every request.

A leaf module, like flaskr's ``db.py``: the blueprints ask ``get_predictor()`` and
never import the app factory.
"""
from __future__ import annotations

import logging
import time

from flask import Flask, current_app

from model import DecodeLimits, Predictor

log = logging.getLogger("app")


def init_app(app: Flask) -> None:
    """Load the checkpoint; a missing, corrupt or incompatible one raises ``CheckpointError``."""
    limits = DecodeLimits(max_pixels=app.config["MAX_IMAGE_PIXELS"])
    started = time.perf_counter()
    predictor = Predictor.from_path(app.config["CHECKPOINT_PATH"], limits)
    if not predictor.works:
        log.error("model %s gives no finite probability: /healthz reports it unavailable", predictor.version)
    app.extensions["predictor"] = predictor
    log.info("loaded model %s from %s in %.2f s", predictor.version, app.config["CHECKPOINT_PATH"],
             time.perf_counter() - started)


def get_predictor() -> Predictor:
    """The predictor loaded at start-up (one per process, shared by its threads)."""
    return current_app.extensions["predictor"]
