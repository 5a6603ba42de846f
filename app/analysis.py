"""Dataset-analysis page: the t-SNE maps, the BokehJS they need, and film thumbnails.

BokehJS is served by this app (hospital networks often have no internet), and the
one inline script that ``components()`` produces carries a per-request CSP nonce.
"""
from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from bokeh.resources import Resources
from bokeh.util.paths import bokehjs_path
from flask import Blueprint, Response, abort, current_app, render_template, send_from_directory

from model import TsneMapError

from .security import content_security_policy
from .serving import get_predictor, tsne_map_path
from .thumbnails import dataset_file, thumbnail_jpeg
from .tsne_plot import placement_item, plot_components

bp = Blueprint("analysis", __name__)

BOKEH_URL = "/bokeh/"
THUMBNAIL_URL = "/analysis/thumbnail/"


@lru_cache(maxsize=1)
def bokeh_js_files() -> tuple[str, ...]:
    """BokehJS from this app's own /bokeh/ route (hospital networks often have no internet);
    the list is worked out once, not on every page."""
    return tuple(Resources(mode="server", root_url=BOKEH_URL, components=["bokeh"]).js_files)


@bp.get("/analysis")
def analysis():
    config = current_app.config
    thumbnails = Path(config["DATASET_DIR"]).is_dir()
    try:
        script, div, tsne_map = plot_components(tsne_map_path(), THUMBNAIL_URL if thumbnails else None)
    except TsneMapError as exc:
        return render_template("analysis.html", plot=None, problem=str(exc))
    nonce = secrets.token_urlsafe(16)
    current_version = get_predictor().version
    summary = {
        "points": len(tsne_map),
        "wrong": int((~tsne_map.correct).sum()),
        "created_at": tsne_map.created_at,
        "version": tsne_map.checkpoint_version,
    }
    html = render_template(
        "analysis.html",
        plot={"script": script.replace("<script", f'<script nonce="{nonce}"', 1), "div": div},
        bokeh_js=bokeh_js_files(),
        summary=summary,
        stale=summary["version"] != current_version,
        current_version=current_version,
        thumbnails=thumbnails,
    )
    response = Response(html)
    response.headers["Content-Security-Policy"] = content_security_policy(script_nonce=nonce, inline_styles=True)
    return response


@bp.get("/analysis/film-map/<version>.json")
def film_map(version: str):
    """The result page's small map (Bokeh JSON) for the serving model's map; cacheable, the same for every film."""
    try:
        map_version, item = placement_item(tsne_map_path())
    except (TsneMapError, OSError):
        abort(404)
    if map_version != version:
        abort(404)
    response = Response(item, mimetype="application/json")
    response.headers["Cache-Control"] = "public, max-age=86400, immutable"
    return response


@bp.get(BOKEH_URL + "static/<path:filename>")
def bokeh_static(filename: str):
    return send_from_directory(bokehjs_path(), filename, max_age=86400)


@bp.get(THUMBNAIL_URL + "<path:relpath>")
def thumbnail(relpath: str):
    """A small JPEG of one dataset image; serves nothing outside the dataset folder."""
    path = dataset_file(Path(current_app.config["DATASET_DIR"]), relpath)
    jpeg = thumbnail_jpeg(path) if path is not None else None
    if jpeg is None:
        abort(404)
    response = Response(jpeg, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response
