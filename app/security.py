"""CSRF protection for the form and security headers on every response."""
from __future__ import annotations

from flask import Response, request
from flask_wtf import CSRFProtect

csrf = CSRFProtect()

# Everything from this origin; nothing from anywhere else. Images may be data: URIs
# (results are rendered inline from memory, never from a stored file).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "img-src 'self' data:",
        "script-src 'self'",
        "style-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


def set_security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.method == "POST" or request.path.startswith("/api/"):
        # Results describe a patient: no browser or proxy may keep them.
        response.headers["Cache-Control"] = "no-store"
    return response
