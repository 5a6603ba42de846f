"""Flask app factory for the pneumonia screening service.

The checkpoint is loaded once, here, when the app is created; a missing, corrupt or
incompatible checkpoint stops start-up with ``CheckpointError`` (see ``wsgi.py``).
"""
from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import click
from flask import Flask, g, request

from . import analysis, api, monitor, pages, serving, worklist
from . import config as app_config
from .cases import CaseRecord
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
    init_case_record(app)
    csrf.init_app(app)
    for blueprint in (pages.bp, api.bp, analysis.bp, worklist.bp, worklist.api, monitor.bp, monitor.api):
        app.register_blueprint(blueprint)
    for blueprint in (api.bp, worklist.api, monitor.api):
        csrf.exempt(blueprint)
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


def init_case_record(app: Flask) -> None:
    """The case record, its schema brought up to date; a database that cannot be reached now
    leaves the app serving, the record degraded, and is asked again on the next write."""
    record = CaseRecord(app.config["DATABASE_URL"])
    record.start()
    app.extensions["cases"] = record

    @app.cli.command("prune-cases")
    @click.option("--older-than-days", type=float, required=True, help="delete cases older than this")
    def prune_cases(older_than_days: float) -> None:
        """Delete cases (and their overreads) older than N days; the count goes to the log."""
        removed = record.prune(older_than_days)
        log.warning("pruned %d cases older than %g days from the case record", removed, older_than_days)
        click.echo(f"deleted {removed} cases older than {older_than_days:g} days")
