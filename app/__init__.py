"""Flask app factory for the pneumonia screening service.

The checkpoint is loaded once, here, when the app is created; a missing, corrupt or
incompatible checkpoint stops start-up with ``CheckpointError`` (see ``wsgi.py``).
"""
from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from flask import Flask, g, request

from . import analysis, api, pages, serving
from . import config as app_config
from .errors import register_error_handlers
from .security import SessionCookies, csrf, set_security_headers
from .uploads import InMemoryRequest

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("app")


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.request_class = InMemoryRequest
    app.session_interface = SessionCookies()
    app.config.from_mapping(app_config.from_environment())
    if config:
        app.config.from_mapping(config)
    if not app.config.get("SECRET_KEY"):
        log.warning("SECRET_KEY is not set: using a random key; forms open across a restart will need a reload")
        app.config["SECRET_KEY"] = secrets.token_hex(32)

    serving.init_app(app)
    csrf.init_app(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(analysis.bp)
    csrf.exempt(api.bp)
    register_error_handlers(app)
    app.after_request(set_security_headers)

    @app.context_processor
    def _served_version():
        # The version that answers this request, on every page (a function: error
        # pages render it too, and only pages that show it ask for it), and the
        # promotion that put it past the guard, if one did.
        return {"served_version": lambda: serving.get_predictor().version,
                "forced_promotion": lambda: app.extensions["model"].forced}

    @app.before_request
    def _start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def _log_request(response):
        # Method, path, status and time only: never file names or image content.
        elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        log.info("%s %s %s %.0f ms", request.method, request.path, response.status_code, elapsed)
        return response

    return app
