"""CSRF protection for the forms, the signed session cookie that holds its token, and security
headers on every response."""
from __future__ import annotations

from flask import Flask, Response, request
from flask.sessions import SecureCookieSessionInterface
from flask_wtf import CSRFProtect
from itsdangerous import URLSafeTimedSerializer

csrf = CSRFProtect()


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed session cookie, with its signer made once per key instead of on every
    request: to make one, itsdangerous serialises an empty dict as a test, which every API
    request paid though it has no session."""

    _signer: tuple[tuple, URLSafeTimedSerializer | None] = ((), None)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        keys = (app.secret_key, tuple(app.config.get("SECRET_KEY_FALLBACKS") or ()), self.salt)
        made_for, signer = self._signer
        if made_for != keys:
            signer = super().get_signing_serializer(app)
            self._signer = (keys, signer)  # one assignment: threads see the old pair or the new
        return signer

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure when configured, and whenever this request came over HTTPS (behind a proxy
        that terminates TLS, gunicorn reads the scheme from X-Forwarded-Proto)."""
        return bool(app.config["SESSION_COOKIE_SECURE"] or request.is_secure)


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


DEFAULT_POLICY = content_security_policy()


def set_security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", DEFAULT_POLICY)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.method == "POST" or request.path.startswith("/api/"):
        # Results describe a patient: no browser or proxy may keep them.
        response.headers["Cache-Control"] = "no-store"
    return response
