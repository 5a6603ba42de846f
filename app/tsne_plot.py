"""The Bokeh figure of a t-SNE map: both splits side by side, pixels and features as tabs.

Building it costs more than the rest of the page, so the embedded (script, div) pair is
kept per map file and rebuilt only when the file changes.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from bokeh.embed import components, json_item
from bokeh.layouts import row
from bokeh.models import ColumnDataSource, HoverTool, InlineStyleSheet, TabPanel, Tabs
from bokeh.plotting import figure

from model import TsneMap
from model.tsne_map import load_shared

COLORS = {"NORMAL": "#2e9e4f", "PNEUMONIA": "#d03b30"}

#: BokehJS draws in shadow roots, where the page's stylesheet does not reach: the keyboard
#: focus is marked there as on the rest of the page (static/style.css, :focus-visible). The
#: plot's canvas takes the focus inside a shadow root of its own: its frame is marked instead.
FOCUS_CSS = ("*:focus-visible { outline: 3px solid #0b57d0 !important; outline-offset: -3px; }"
             ".bk-Canvas:focus-within { outline: 3px solid #0b57d0; outline-offset: -3px; }")


#: The two splits side by side, and one above the other where the page is a phone's width: side by
#: side there, each map was about 170 px wide with its title and legend cut.
STACK_ON_PHONES = ("@media (max-width: 640px) {"
                   " :host { flex-direction: column !important; height: auto !important; }"
                   " :host > * { width: 100% !important; height: auto !important; aspect-ratio: 1 / 1;"
                   " flex: none !important; } }")


def keyboard_visible(*models) -> None:
    for model in models:  # a stylesheet each: a Bokeh model belongs to one document
        model.stylesheets = [*model.stylesheets, InlineStyleSheet(css=FOCUS_CSS)]


def _sources(tsne_map: TsneMap, thumbnail_url: str | None) -> dict[str, tuple[ColumnDataSource, ColumnDataSource]]:
    """Per split: all points, and the misclassified ones (drawn on top with a cross)."""
    labels = np.where(tsne_map.label == 1, "PNEUMONIA", "NORMAL")
    data = {
        "px": tsne_map.pixel_xy[:, 0], "py": tsne_map.pixel_xy[:, 1],
        "fx": tsne_map.feature_xy[:, 0], "fy": tsne_map.feature_xy[:, 1],
        "file": tsne_map.files, "split": tsne_map.split, "label": labels,
        "color": np.array([COLORS[label] for label in labels]),
        "probability": tsne_map.probability,
        "verdict": np.where(tsne_map.correct, "right", "WRONG"),
    }
    if thumbnail_url:
        data["thumb"] = np.array([thumbnail_url + str(f) for f in tsne_map.files])
    sources = {}
    for split in ("train", "test"):
        mask = tsne_map.split == split
        wrong = mask & ~tsne_map.correct
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


def build_layout(tsne_map: TsneMap, thumbnail_url: str | None) -> Tabs:
    sources = _sources(tsne_map, thumbnail_url)
    panels = []
    for title, (x, y) in (("Pixels", ("px", "py")), ("Learned features", ("fx", "fy"))):
        plots, shared = [], {}
        for split, name in (("train", "Training split"), ("test", "Test split")):
            points, wrong = sources[split]
            plot = figure(
                title=f"{name} ({len(points.data['file'])} images)",
                width=560, height=560, sizing_mode="scale_width", tools="pan,wheel_zoom,box_zoom,reset,save",
                active_scroll="wheel_zoom", **shared,
            )
            shared = {"x_range": plot.x_range, "y_range": plot.y_range}  # linked pan and zoom
            dots = plot.scatter(x, y, source=points, size=5, color="color", alpha=0.6, legend_field="label")
            crosses = plot.scatter(x, y, source=wrong, marker="x", size=9, color="#111111", line_width=1.5,
                                   legend_label="model wrong")
            plot.add_tools(HoverTool(renderers=[dots, crosses], tooltips=_tooltip(bool(thumbnail_url))))
            legend_below(plot)
            plot.legend.click_policy = "hide"
            plot.axis.visible = False
            plot.grid.visible = False
            plot.toolbar.logo = None  # a link off this site, and a tab stop, in every plot
            keyboard_visible(plot, plot.toolbar)
            plots.append(plot)
        pair = row(*plots, sizing_mode="scale_width")
        pair.stylesheets = [*pair.stylesheets, InlineStyleSheet(css=STACK_ON_PHONES)]
        panels.append(TabPanel(child=pair, title=title))
    tabs = Tabs(tabs=panels, sizing_mode="scale_width")
    keyboard_visible(tabs)
    return tabs


def legend_below(plot) -> None:
    """The legend under the plot, in a row: inside it, it hid the points in its corner."""
    legend = plot.legend[0]
    legend.orientation = "horizontal"
    plot.add_layout(legend, "below")


def plot_components(path: Path, thumbnail_url: str | None) -> tuple[str, str, TsneMap]:
    """(script, div, map) for the map file at ``path``; raises ``TsneMapError``."""
    stat = path.stat() if path.is_file() else None
    return _cached_components(str(path), stat and stat.st_mtime_ns, thumbnail_url)


@lru_cache(maxsize=4)
def _cached_components(path: str, mtime_ns: int | None, thumbnail_url: str | None) -> tuple[str, str, TsneMap]:
    tsne_map = load_shared(path, mtime_ns)
    script, div = components(build_layout(tsne_map, thumbnail_url))
    return script, div, tsne_map


#: Recent cases on the map, by the clinician's read.
READ_COLORS = {"pneumonia": "#d03b30", "normal": "#2e9e4f", "uncertain": "#e08a00", "awaiting": "#ffffff"}


def cases_figure(tsne_map: TsneMap, xy: np.ndarray, reads: list[str]):
    """The training split's learned features coloured by label, and recent cases on them (placed
    as the result page places its star) as outlined diamonds coloured by the clinician's read: a
    read that disagrees with the training films around it shows as a diamond of the other colour."""
    train = tsne_map.split == "train"
    plot = figure(title=f"The last {len(reads)} cases on the training films' learned-features map",
                  width=620, height=560, sizing_mode="scale_width", tools="pan,wheel_zoom,reset",
                  active_scroll="wheel_zoom")
    for value, name in ((0, "NORMAL"), (1, "PNEUMONIA")):
        chosen = train & (tsne_map.label == value)
        plot.scatter(tsne_map.feature_xy[chosen, 0], tsne_map.feature_xy[chosen, 1], size=4, color=COLORS[name],
                     alpha=0.3, legend_label=f"training {name}")
    for read, color in READ_COLORS.items():
        chosen = [i for i, r in enumerate(reads) if r == read]
        if chosen:
            plot.scatter(xy[chosen, 0], xy[chosen, 1], marker="diamond", size=13, fill_color=color,
                         line_color="#111111", line_width=1.5,
                         legend_label=f"read {read}" if read != "awaiting" else "awaiting a read")
    legend_below(plot)
    plot.legend.click_policy = "hide"
    plot.axis.visible = False
    plot.grid.visible = False
    plot.toolbar.logo = None
    keyboard_visible(plot, plot.toolbar)
    return plot


UPLOAD_SOURCE = "upload"  # the marker's data source, filled in the browser by static/place.js


def placement_item(path: Path) -> tuple[str, str]:
    """The small map of the training split's learned features as Bokeh JSON, with an empty
    marker source that ``static/place.js`` fills per page. Built once per map file, fetched
    once per browser (it is the same for every film), and nothing of an upload is in it.
    Returns (the map's model version, the JSON)."""
    return _placement(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=2)
def _placement(path: str, mtime_ns: int) -> tuple[str, str]:
    tsne_map = load_shared(path, mtime_ns)
    train = tsne_map.split == "train"
    labels = np.where(tsne_map.label[train] == 1, "PNEUMONIA", "NORMAL")
    points = ColumnDataSource({"x": tsne_map.feature_xy[train, 0], "y": tsne_map.feature_xy[train, 1],
                               "label": labels, "color": np.array([COLORS[label] for label in labels])})
    plot = figure(title="Training split, learned features", width=420, height=420, sizing_mode="scale_width",
                  toolbar_location=None, tools="")  # a small map to find the star: no tools to tab through
    plot.scatter("x", "y", source=points, size=4, color="color", alpha=0.45, legend_field="label")
    upload = ColumnDataSource({"x": [], "y": []}, name=UPLOAD_SOURCE)
    plot.scatter("x", "y", source=upload, marker="star", size=22, fill_color="#f2c200", line_color="#111111",
                 line_width=2, legend_label="this film")
    legend_below(plot)
    plot.axis.visible = False
    plot.grid.visible = False
    keyboard_visible(plot)
    return tsne_map.checkpoint_version, json.dumps(json_item(plot, "film-map-plot"))
