"""Dataset-analysis page: Bokeh t-SNE maps of the training and test splits.

BokehJS is served by this app (hospital networks often have no internet), and the
one inline script that ``components()`` produces carries a per-request CSP nonce.
"""
from __future__ import annotations

import secrets
import threading
from pathlib import Path

import cv2
import numpy as np
from bokeh.embed import components
from bokeh.layouts import row
from bokeh.models import ColumnDataSource, HoverTool, TabPanel, Tabs
from bokeh.plotting import figure
from bokeh.resources import Resources
from bokeh.util.paths import bokehjs_path
from flask import Blueprint, Response, abort, current_app, render_template, send_from_directory

from . import get_predictor
from .security import CONTENT_SECURITY_POLICY

bp = Blueprint("analysis", __name__)

BOKEH_URL = "/bokeh/"
COLORS = {"NORMAL": "#2e9e4f", "PNEUMONIA": "#d03b30"}
THUMBNAIL_SIDE = 160
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class ArtifactError(RuntimeError):
    """The t-SNE artifact is missing or unreadable; the message says how to make it."""


def load_artifact(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"No t-SNE artifact at {path}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            artifact = {key: data[key] for key in data.files}
        n = len(artifact["label"])
        for key in ("pixel_xy", "feature_xy", "split", "files", "probability", "correct"):
            if len(artifact[key]) != n:
                raise ValueError(key)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise ArtifactError(f"The t-SNE artifact at {path} is unreadable ({type(exc).__name__}).") from None
    return artifact


def _sources(artifact: dict, thumbnails: bool) -> dict[str, tuple[ColumnDataSource, ColumnDataSource]]:
    """Per split: all points, and the misclassified ones (drawn on top with a cross)."""
    labels = np.where(artifact["label"] == 1, "PNEUMONIA", "NORMAL")
    data = {
        "px": artifact["pixel_xy"][:, 0], "py": artifact["pixel_xy"][:, 1],
        "fx": artifact["feature_xy"][:, 0], "fy": artifact["feature_xy"][:, 1],
        "file": artifact["files"], "split": artifact["split"], "label": labels,
        "color": np.array([COLORS[label] for label in labels]),
        "probability": artifact["probability"],
        "verdict": np.where(artifact["correct"], "right", "WRONG"),
    }
    if thumbnails:
        data["thumb"] = np.array([f"/analysis/thumbnail/{f}" for f in artifact["files"]])
    sources = {}
    for split in ("train", "test"):
        mask = artifact["split"] == split
        wrong = mask & ~artifact["correct"]
        sources[split] = (
            ColumnDataSource({k: v[mask] for k, v in data.items()}),
            ColumnDataSource({k: v[wrong] for k, v in data.items()}),
        )
    return sources


def _tooltip(thumbnails: bool) -> str:
    image = '<img class="thumb" src="@thumb" alt="" width="96" height="96">' if thumbnails else ""
    return (
        f'<div class="tsne-tip">{image}<div><b>@file</b><br>split: @split<br>label: @label<br>'
        "P(pneumonia): @probability{0.000}<br>model: @verdict</div></div>"
    )


def build_layout(artifact: dict, thumbnails: bool) -> Tabs:
    sources = _sources(artifact, thumbnails)
    panels = []
    for title, (x, y) in (("Pixels", ("px", "py")), ("Learned features", ("fx", "fy"))):
        plots, shared = [], {}
        for split, name in (("train", "Training split"), ("test", "Test split")):
            points, wrong = sources[split]
            plot = figure(
                title=f"{name} ({len(points.data['file'])} images)",
                width=560, height=520, tools="pan,wheel_zoom,box_zoom,reset,save",
                active_scroll="wheel_zoom", **shared,
            )
            shared = {"x_range": plot.x_range, "y_range": plot.y_range}  # linked pan and zoom
            dots = plot.scatter(x, y, source=points, size=5, color="color", alpha=0.6, legend_field="label")
            crosses = plot.scatter(x, y, source=wrong, marker="x", size=9, color="#111111", line_width=1.5,
                                   legend_label="model wrong")
            plot.add_tools(HoverTool(renderers=[dots, crosses], tooltips=_tooltip(thumbnails)))
            plot.legend.location = "top_left"
            plot.legend.click_policy = "hide"
            plot.axis.visible = False
            plot.grid.visible = False
            plots.append(plot)
        panels.append(TabPanel(child=row(*plots), title=title))
    return Tabs(tabs=panels)


_cache: dict = {}
_cache_lock = threading.Lock()


def plot_components(path: Path, thumbnails: bool) -> tuple[str, str, dict]:
    """(script, div, artifact) for the artifact at ``path``; rebuilt only when the file changes."""
    stat = path.stat() if path.is_file() else None
    key = (str(path), stat and stat.st_mtime_ns, thumbnails)
    with _cache_lock:
        if _cache.get("key") != key:
            artifact = load_artifact(path)
            script, div = components(build_layout(artifact, thumbnails))
            _cache.update(key=key, value=(script, div, artifact))
        return _cache["value"]


def bokeh_resources() -> Resources:
    return Resources(mode="server", root_url=BOKEH_URL, components=["bokeh"])


@bp.get("/analysis")
def analysis():
    config = current_app.config
    dataset = Path(config["DATASET_DIR"])
    thumbnails = dataset.is_dir()
    try:
        script, div, artifact = plot_components(Path(config["TSNE_ARTIFACT"]), thumbnails)
    except ArtifactError as exc:
        return render_template("analysis.html", plot=None, problem=str(exc))
    nonce = secrets.token_urlsafe(16)
    current_version = get_predictor().version
    summary = {
        "points": len(artifact["label"]),
        "wrong": int((~artifact["correct"]).sum()),
        "created_at": str(artifact["created_at"]),
        "version": str(artifact["checkpoint_version"]),
    }
    html = render_template(
        "analysis.html",
        plot={"script": script.replace("<script", f'<script nonce="{nonce}"', 1), "div": div},
        bokeh_js=bokeh_resources().js_files,
        summary=summary,
        stale=summary["version"] != current_version,
        current_version=current_version,
        thumbnails=thumbnails,
    )
    response = Response(html)
    # BokehJS adds <style> elements to its shadow roots, hence 'unsafe-inline' for
    # styles on this page only; scripts stay restricted to this origin and the nonce.
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY.replace(
        "script-src 'self'", f"script-src 'self' 'nonce-{nonce}'"
    ).replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
    return response


@bp.get(BOKEH_URL + "static/<path:filename>")
def bokeh_static(filename: str):
    return send_from_directory(bokehjs_path(), filename, max_age=86400)


@bp.get("/analysis/thumbnail/<path:relpath>")
def thumbnail(relpath: str):
    """A small JPEG of one dataset image; serves nothing outside the dataset folder."""
    root = Path(current_app.config["DATASET_DIR"]).resolve()
    path = (root / relpath).resolve()
    if not root.is_dir() or not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_SUFFIXES:
        abort(404)
    if not path.is_file():
        abort(404)
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        abort(404)
    scale = THUMBNAIL_SIDE / max(image.shape)
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    response = Response(buffer.tobytes(), mimetype="image/jpeg")
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response
