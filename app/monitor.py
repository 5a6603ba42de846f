"""Drift and agreement for the serving version, from its recent cases: /monitor and
GET /api/v1/monitor.

- cases per day over the last ``WINDOW_DAYS``;
- the share refused by the population gate over the last ``RECENT`` cases (and why),
  against the version's own reference;
- the population stability index of the probabilities of the last ``PSI_CASES`` films
  within the intended use, against the reference's;
- agreement with the clinicians' overreads (sensitivity, specificity, PPV with Wilson 95%
  intervals) against the reference's figures, and the local validation of the overread
  cases (``model.validation``, as ``training.site report`` gives it).

The reference is the test split (its probabilities from the version's t-SNE map), or for a
version adapted to a site (``training.site adapt``) that site's held-out films.

Alerts: the index past ``PSI_ALERT``; refusals at twice the test split's rate or more;
sensitivity or specificity below the model card's 95% interval, over ``MIN_OVERREADS``.
"""
from __future__ import annotations

import datetime as dt
import secrets
from functools import lru_cache

import numpy as np
from bokeh.embed import components
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure
from flask import Blueprint, Response, current_app, jsonify, render_template
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from model import TsneMapError, card
from model.tsne_map import load_shared
from model.validation import local_validation, proportion

from .analysis import bokeh_js_files
from .cases import READS, Case, delivery_figures
from .security import content_security_policy
from .serving import get_predictor, tsne_map_path
from .tsne_plot import keyboard_visible

bp = Blueprint("monitor", __name__)
api = Blueprint("monitor_api", __name__, url_prefix="/api/v1")

WINDOW_DAYS = 30
RECENT = 200
PSI_CASES = 5000
PSI_ALERT = 0.2
MIN_PSI_CASES = 100
MIN_OVERREADS = 30


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected``, over ``expected``'s deciles."""
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(expected)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(actual)
    e, a = np.clip(e, 1e-4, None), np.clip(a, 1e-4, None)
    return float(np.sum((a - e) * np.log(a / e)))


@lru_cache(maxsize=2)
def _test_probabilities(path: str, mtime_ns: int) -> tuple[str, np.ndarray]:
    tsne_map = load_shared(path, mtime_ns)
    return tsne_map.checkpoint_version, np.asarray(tsne_map.probability[tsne_map.split == "test"], np.float64)


def reference(version: str, checkpoint) -> dict:
    """What the serving version's recent films are compared with: for a site-adapted version the
    site's held-out films it was judged on, else the test split (probabilities from its t-SNE map)."""
    site = card.site(checkpoint.metrics)
    if site and site.get("reference"):
        held = site["held_out"]
        return {"name": f"site {site['name']}'s held-out films", "probabilities": np.asarray(site["reference"]),
                "refused": held["refused"]["value"], "sensitivity": held["sensitivity"],
                "false_positive_rate": held["false_positive_rate"]}
    figures = card.card_figures(checkpoint.metrics)
    return {"name": "the test split", "probabilities": test_probabilities(version),
            "refused": figures["refused"]["value"], "sensitivity": figures["sensitivity"],
            "false_positive_rate": figures["false_positive_rate"]}


def test_probabilities(version: str) -> np.ndarray | None:
    """The test split's probabilities under ``version`` (its t-SNE map holds them), or None."""
    path = tsne_map_path(version)
    try:
        map_version, probabilities = _test_probabilities(str(path), path.stat().st_mtime_ns)
    except (OSError, TsneMapError, ValueError):
        return None
    return probabilities if map_version == version else None


def figures(engine, version: str, checkpoint) -> dict:
    """Everything /monitor shows, for ``version``."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=WINDOW_DAYS)
    mine = Case.model_version == version
    with Session(engine) as session:
        day = func.date(Case.created_at)
        per_day = [(str(d), n) for d, n in session.execute(
            select(day, func.count()).where(mine, Case.created_at >= since).group_by(day).order_by(day))]
        recent = session.execute(select(Case.decision, Case.refusal).where(mine)
                                 .order_by(Case.created_at.desc()).limit(RECENT)).all()
        probabilities = np.array(session.scalars(
            select(Case.probability).where(mine, Case.decision.is_not(None))
            .order_by(Case.created_at.desc()).limit(PSI_CASES)).all(), dtype=np.float64)
        reads = session.execute(select(Case.decision, Case.overread, func.count())
                                .where(mine, Case.decision.is_not(None), Case.overread.in_(("pneumonia", "normal")))
                                .group_by(Case.decision, Case.overread)).all()
        overread = session.execute(select(Case.overread, Case.probability, Case.refusal)
                                   .where(mine, Case.overread.in_(READS))
                                   .order_by(Case.created_at.desc()).limit(SITE_REPORT_CASES)).all()
    against = reference(version, checkpoint)
    refused = [reasons for decision, reasons in recent if decision is None]
    why: dict[str, int] = {}
    for reasons in refused:
        for check in (reasons or "unknown").split(","):
            why[check] = why.get(check, 0) + 1
    refusal = {**proportion(len(refused), len(recent)), "why": why, "test_split": against["refused"]}

    expected = against["probabilities"]
    stability = {"value": None, "cases": len(probabilities), "reference": None if expected is None else len(expected)}
    if expected is not None and len(probabilities) >= MIN_PSI_CASES:
        stability["value"] = psi(expected, probabilities)

    counts = {(decision, read): n for decision, read, n in reads}
    tp, fn = counts.get(("PNEUMONIA", "pneumonia"), 0), counts.get(("NORMAL", "pneumonia"), 0)
    tn, fp = counts.get(("NORMAL", "normal"), 0), counts.get(("PNEUMONIA", "normal"), 0)
    fpr = against["false_positive_rate"]
    agreement = {
        "overreads": tp + fn + tn + fp,
        "sensitivity": {**proportion(tp, tp + fn), "model_card": against["sensitivity"]["value"],
                        "model_card_interval": against["sensitivity"]["interval"]},
        "specificity": {**proportion(tn, tn + fp),
                        "model_card": None if fpr["value"] is None else 1 - fpr["value"],
                        "model_card_interval": [1 - fpr["interval"][1], 1 - fpr["interval"][0]]
                        if fpr.get("interval") else None},
        "ppv": proportion(tp, tp + fp),
    }
    with Session(engine) as session:
        deliveries = delivery_figures(session)
    return {"model_version": version, "window_days": WINDOW_DAYS, "cases_per_day": per_day, "refusal": refusal,
            "stability": stability, "agreement": agreement, "reference_name": against["name"],
            "site_report": site_report(overread, checkpoint.threshold), "deliveries": deliveries,
            "alerts": alerts(refusal, stability, agreement, against["name"]) + delivery_alerts(deliveries),
            "waiting": waiting(refusal, stability, agreement), "probabilities": probabilities, "reference": expected}


#: The local validation reads the latest this many overread cases: its intervals are narrow long
#: before, and reading 100,000 of them took /monitor past a second on PostgreSQL (bench.cases).
SITE_REPORT_CASES = 10_000
#: A structured report still waiting after this long means the PACS has been unreachable for a while.
LATE_REPORT = dt.timedelta(minutes=10)


def delivery_alerts(deliveries: dict) -> list[str]:
    found = []
    if deliveries["failed"]:
        found.append(f"{deliveries['failed']} structured reports were refused by the PACS for good: the cases "
                     "say why; they are not sent again by themselves")
    oldest = deliveries["oldest_pending"]
    if oldest is not None and dt.datetime.now(dt.UTC) - oldest > LATE_REPORT:
        minutes = (dt.datetime.now(dt.UTC) - oldest).total_seconds() / 60
        found.append(f"{deliveries['pending']} structured reports wait for the PACS, the oldest for {minutes:.0f} "
                     "minutes: is the PACS reachable (DICOM_DESTINATION)?")
    return found


def site_report(overread: list, threshold: float) -> dict:
    """The local validation (``training.site report``'s figures) of the serving version on its overread
    cases: the clinicians' reads as labels, refused films counted; "uncertain" reads left out and counted."""
    labelled = [(read == "pneumonia", p, refusal or "") for read, p, refusal in overread
                if read in ("pneumonia", "normal") and p is not None]
    found = local_validation(np.array([y for y, _, _ in labelled], dtype=int),
                             np.array([p for _, p, _ in labelled], dtype=np.float64), threshold,
                             [r for _, _, r in labelled])
    found["uncertain"] = sum(1 for read, _, _ in overread if read == "uncertain")
    return found


def alerts(refusal: dict, stability: dict, agreement: dict, against: str = "the test split") -> list[str]:
    """What contradicts the reference. A share alerts as soon as its 95% interval lies wholly on the wrong
    side of the reference's figure, however few the cases (a wide interval that still excludes it is
    evidence); with enough cases, also when the share falls below the reference's own interval."""
    found = []
    if stability["value"] is not None and stability["value"] > PSI_ALERT:
        found.append(f"The probabilities of the last {stability['cases']} films have drifted from {against} "
                     f"(stability index {stability['value']:.2f} > {PSI_ALERT}): the films arriving differ from "
                     "those the model was measured on.")
    rate, interval = refusal["test_split"], refusal["interval"]
    if rate is not None and interval and (interval[0] > rate or (refusal["n"] >= RECENT
                                                                 and refusal["value"] >= 2 * max(rate, 0.01))):
        found.append(f"{refusal['value']:.0%} of the last {refusal['n']} films were refused as outside the intended "
                     f"use (95%: {interval[0]:.0%}-{interval[1]:.0%}), against {rate:.1%} of {against}: check what "
                     "is being sent.")
    for name in ("sensitivity", "specificity"):
        share = agreement[name]
        card, card_interval, interval = share["model_card"], share["model_card_interval"], share["interval"]
        excluded = interval is not None and card is not None and interval[1] < card
        below = share["n"] >= MIN_OVERREADS and card_interval and share["value"] < card_interval[0]
        if excluded or below:
            found.append(f"The {name} against the clinicians' overreads, {share['value']:.1%} over {share['n']} "
                         f"films (95%: {interval[0]:.1%}-{interval[1]:.1%}), is below {against}'s "
                         f"{card:.1%}" + (f" and its 95% interval ({card_interval[0]:.1%}-{card_interval[1]:.1%})."
                                          if below else "."))
    return found


def waiting(refusal: dict, stability: dict, agreement: dict) -> list[str]:
    """What the monitor cannot judge yet, and how many cases each check needs: never "no alert" beside them."""
    needs = []
    if refusal["n"] < RECENT:
        needs.append(f"refusals: {refusal['n']} of the {RECENT} recent films they are judged on")
    if stability["value"] is None:
        needs.append(f"drift: {stability['cases']} of {MIN_PSI_CASES} answered films")
    for name, read in (("sensitivity", "pneumonia"), ("specificity", "normal")):
        if agreement[name]["n"] < MIN_OVERREADS:
            needs.append(f"{name}: {agreement[name]['n']} of {MIN_OVERREADS} answered films read {read}")
    return needs


def charts(found: dict):
    """The two charts: cases a day, and the spread of the probabilities against the reference's.
    Each scales to its own box, so that on a phone they stack at the page's width."""
    per_day_counts = found["cases_per_day"]
    days = ColumnDataSource({"day": [d for d, _ in per_day_counts], "n": [n for _, n in per_day_counts]})
    per_day = figure(x_range=days.data["day"] or ["-"], height=300, width=480, sizing_mode="scale_width",
                     title="Cases a day", toolbar_location=None, tools="")
    per_day.vbar(x="day", top="n", source=days, width=0.8, color="#1f5fa8")
    per_day.xaxis.major_label_orientation = 0.9
    spread = figure(height=300, width=480, sizing_mode="scale_width", toolbar_location=None, tools="",
                    title="Probabilities: recent films and reference", x_range=(0, 1))
    edges = np.linspace(0, 1, 21)
    for values, colour, label in ((found["reference"], "#888888", found["reference_name"]),
                                  (found["probabilities"], "#d03b30", "recent films")):
        if values is not None and len(values):
            share = np.histogram(values, bins=edges)[0] / len(values)
            # a step is drawn from each x to the next: the last bin (0.95-1) needs its right edge too
            spread.step(edges, np.r_[share, share[-1]], mode="after", color=colour, line_width=2, legend_label=label)
    if spread.legend:
        spread.legend.location = "top_center"
    keyboard_visible(per_day, spread)
    return per_day, spread


def plots(found: dict) -> tuple[str, tuple[str, str]]:
    return components(charts(found))


def current_figures() -> dict:
    predictor = get_predictor()
    return figures(current_app.extensions["cases"].engine, predictor.version, predictor.checkpoint)


@bp.get("/monitor")
def monitor():
    found = current_figures()
    script, divs = plots(found)
    nonce = secrets.token_urlsafe(16)
    html = render_template("monitor.html", found=found, plot={"divs": divs,
                           "script": script.replace("<script", f'<script nonce="{nonce}"', 1)},
                           bokeh_js=bokeh_js_files(), psi_alert=PSI_ALERT, recent=RECENT,
                           site_report_cases=SITE_REPORT_CASES)
    response = Response(html)
    response.headers["Content-Security-Policy"] = content_security_policy(script_nonce=nonce, inline_styles=True)
    return response


@api.get("/monitor")
def monitor_api():
    found = current_figures()
    found.pop("probabilities"), found.pop("reference")
    return jsonify(found)
