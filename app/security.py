"""CSRF protection for the forms and security headers on every response."""
from __future__ import annotations

from flask import Response, request
from flask_wtf import CSRFProtect

csrf = CSRFProtect()


def content_security_policy(script_nonce: str | None = None, inline_styles: bool = False) -> str:
    """Everything from this origin, nothing from anywhere else.

    Images may be data: URIs (results are rendered inline from memory, never from a
    stored file). A page with an inline script names it by nonce; ``inline_styles``
    is for BokehJS, which writes <style> elements into its shadow roots.
    """
    script = "script-src 'self'" + (f" 'nonce-{script_nonce}'" if script_nonce else "")
    style = "style-src 'self'" + (" 'unsafe-inline'" if inline_styles else "")
    return "; ".join([
        "default-src 'self'", "img-src 'self' data:", script, style, "object-src 'none'",
        "base-uri 'none'", "form-action 'self'", "frame-ancestors 'none'",
    ])


def set_security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", content_security_policy())
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.method == "POST" or request.path.startswith("/api/"):
        # Results describe a patient: no browser or proxy may keep them.
        response.headers["Cache-Control"] = "no-store"
    return response
