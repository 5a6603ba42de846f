"""Every failure becomes a clear message with the right status: JSON under /api/, HTML elsewhere.

Nothing reaches the user as a stack trace; unexpected errors are logged server-side.
"""
from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from model import ImageError, ImageTooLargeError, UnreadableFileError, UnsupportedImageError

from .uploads import log_unreadable

log = logging.getLogger("app")


def status_for(error: ImageError) -> int:
    if isinstance(error, ImageTooLargeError):
        return 413
    if isinstance(error, UnsupportedImageError):
        return 415
    return 400


def error_response(message: str, status: int):
    if request.path.startswith("/api/") or request.path == "/healthz":
        return jsonify(error=message), status
    return render_template("error.html", message=message, status=status), status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ImageError)
    def _image_error(error: ImageError):
        if isinstance(error, UnreadableFileError):
            log_unreadable(error)
        return error_response(str(error), status_for(error))

    @app.errorhandler(CSRFError)
    def _csrf_error(error: CSRFError):
        message = "The form has expired or did not come from this site; reload the page and try again."
        return error_response(message, 400)

    @app.errorhandler(413)
    def _too_large(error):
        limit = app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        return error_response(f"The upload is too large; the limit is {limit:g} MB.", 413)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        return error_response(error.description or error.name, error.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response("Something went wrong on our side; the image was not analysed. Please try again.", 500)
