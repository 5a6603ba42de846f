"""Dataset-analysis page: the t-SNE maps, the BokehJS they need, and film thumbnails.

BokehJS is served by this app (hospital networks often have no internet), and the
one inline script that ``components()`` produces carries a per-request CSP nonce.
"""
from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

import numpy as np
from bokeh.embed import components
from bokeh.resources import Resources
from bokeh.util.paths import bokehjs_path
from flask import Blueprint, Response, abort, current_app, render_template, send_from_directory
from sqlalchemy import select
from sqlalchemy.orm import Session

from model import TsneMapError

from .cases import Case
from .security import content_security_policy
from .serving import get_predictor, neighbour_index, tsne_map_path
from .thumbnails import dataset_file, thumbnail_jpeg
from .tsne_plot import cases_figure, placement_item, plot_components

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
    recent = recent_cases_plot(tsne_map, current_version)
    summary = {
        "points": len(tsne_map),
        "wrong": int((~tsne_map.correct).sum()),
        "created_at": tsne_map.created_at,
        "version": tsne_map.checkpoint_version,
    }
    html = render_template(
        "analysis.html",
        plot={"script": script.replace("<script", f'<script nonce="{nonce}"', 1), "div": div},
        recent=recent and {"script": recent[0].replace("<script", f'<script nonce="{nonce}"', 1), "div": recent[1]},
        bokeh_js=bokeh_js_files(),
        summary=summary,
        stale=summary["version"] != current_version,
        current_version=current_version,
        thumbnails=thumbnails,
    )
    response = Response(html)
    response.headers["Content-Security-Policy"] = content_security_policy(script_nonce=nonce, inline_styles=True)
    return response


RECENT_CASES = 500


def recent_cases_plot(tsne_map, version: str) -> tuple[str, str] | None:
    """(script, div) of the last cases within the intended use on the learned-features map;
    None without such cases, or when the map is another version's (its places would be wrong)."""
    index, _ = neighbour_index(version)  # the result page's index, made once per map
    if index is None:
        return None
    query = (select(Case.features, Case.overread).where(Case.model_version == version, Case.decision.is_not(None),
                                                        Case.features.is_not(None))
             .order_by(Case.created_at.desc()).limit(RECENT_CASES))
    try:
        with Session(current_app.extensions["cases"].engine) as session:
            rows = session.execute(query).all()
    except Exception:  # noqa: BLE001 - the record being down costs the page this map, nothing else
        return None
    if not rows:
        return None
    features = np.stack([np.frombuffer(blob, np.float16).astype(np.float32) for blob, _ in rows])
    xy = index.place(features)
    return components(cases_figure(tsne_map, xy, [read or "awaiting" for _, read in rows]))


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
