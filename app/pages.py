"""The clinician's pages: upload, result, batch results, the model card; and the health check."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, redirect, render_template, request, url_for

from model.card import GATE_GOALS, test_figures
from model.neighbours import COUNT_K
from model.store import StoreError

from .analysis import THUMBNAIL_URL, bokeh_js_files
from .render import png_bytes_data_uri, png_data_uri, reliability_bars, roc_polyline, saliency_empty, saliency_png
from .security import content_security_policy
from .serving import clinic_probability, get_predictor, neighbour_index
from .thumbnails import dataset_file
from .uploads import predict_each, read_age, read_batch_upload, read_single_upload, upload_name
from .worklist import answer_upload

bp = Blueprint("pages", __name__)

ACCEPTED_FORMATS = "JPEG, PNG (8- or 16-bit), DICOM (CR/DX), TIFF, BMP, WebP"
SIMILAR_SHOWN = 6
#: Rows of the robustness table as checkpoints made before 2026-12-06 name them: one name
#: each said "(a wider film)" though one stretches and the other squeezes.
ROBUSTNESS_NAMES = {"taller 8% (a wider film)": "stretched 8% taller (as a film 8% wider)",
                    "narrower 8% (a wider film)": "squeezed 8% narrower (as a film 8% wider)",
                    "shorter 8% (a narrower film)": "squeezed 8% shorter (as a film 8% narrower)"}


def upload_limits() -> dict:
    config = current_app.config
    return {
        "formats": ACCEPTED_FORMATS,
        "max_mb": config["MAX_CONTENT_LENGTH"] / (1024 * 1024),
        "max_megapixels": config["MAX_IMAGE_PIXELS"] / 1e6,
        "max_batch": config["MAX_BATCH_FILES"],
    }


@bp.get("/")
def index():
    return render_template("index.html", limits=upload_limits(), model=get_predictor().checkpoint)


@bp.post("/predict")
def predict():
    predictor = get_predictor()
    data, age = read_single_upload(request), read_age(request)
    answered = answer_upload(data, "page", age, saliency=True)
    prediction, case_id = answered.prediction, answered.case_id
    similar = similar_films(prediction) if prediction.in_distribution else None
    html = render_template(
        "result.html",
        prediction=prediction,
        case_id=case_id,
        filename=upload_name(request),
        shown=shown_probability(prediction.probability),
        age=age,
        input_uri=png_data_uri(prediction.model_input),
        aligned_uri=png_data_uri(prediction.aligned),
        saliency_uri=None if saliency_empty(prediction.saliency) else png_bytes_data_uri(
            saliency_png(prediction.aligned, prediction.saliency, side=64)),
        saliency_measured=predictor.checkpoint.metrics.get("saliency"),
        model=predictor.checkpoint,
        test_metrics=test_figures(predictor.checkpoint.metrics),
        similar=similar,
    )
    response = Response(html)
    if similar and similar.get("neighbours"):
        # BokehJS writes <style> elements into its shadow roots.
        response.headers["Content-Security-Policy"] = content_security_policy(inline_styles=True)
    return response


@bp.app_template_global()
def prevalence() -> dict:
    """The validation mix the probabilities are calibrated to, and the clinic's setting (or None)."""
    return {"calibration": get_predictor().checkpoint.calibration_prevalence,
            "clinic": current_app.config.get("CLINIC_PREVALENCE")}


@bp.app_template_filter("percent")
def percent_text(probability: float) -> str:
    """A probability as pages print it, to a tenth of a percent; never "100.0%" or "0.0%", which
    would read as certainty the model does not have."""
    value = 100 * probability
    if value >= 99.95:
        return "> 99.9%"
    if value < 0.05:
        return "< 0.1%"
    return f"{value:.1f}%"


@bp.app_template_global()
def shown_probability(probability: float) -> float:
    """The probability as pages show it: for the clinic's expected prevalence when one is set
    (``CLINIC_PREVALENCE``); the decision stays at the validated threshold either way."""
    at_clinic = clinic_probability(probability)
    return probability if at_clinic is None else at_clinic


def similar_films(prediction) -> dict:
    """The 6 nearest training films (thumbnails where the dataset folder is here) and this film's
    place on the training map; or why they cannot be shown."""
    index, problem = neighbour_index()
    if index is None:
        return {"problem": problem}
    neighbours, pneumonia, (x, y) = index.nearest(prediction.features, SIMILAR_SHOWN)
    thumbnails = Path(current_app.config["DATASET_DIR"]).is_dir()
    return {
        "neighbours": neighbours, "pneumonia": pneumonia, "count": COUNT_K, "x": x, "y": y,
        "thumbnail_url": THUMBNAIL_URL if thumbnails else None, "bokeh_js": bokeh_js_files(),
        "map_url": url_for("analysis.film_map", version=index.version),
    }


@bp.post("/predict/batch")
def predict_batch():
    predictor = get_predictor()
    files = read_batch_upload(request, current_app.config["MAX_BATCH_FILES"])
    rows = predict_each(predictor, files, read_age(request), "batch")
    rows.sort(key=batch_order)
    return render_template("batch.html", rows=rows, model=predictor.checkpoint)


def batch_order(row: dict) -> float:
    """Most suspicious first (the table re-sorts in the browser); then films outside the intended use; refusals last."""
    prediction = row.get("prediction")
    if prediction is None:
        return 3.0
    return -prediction.probability if prediction.in_distribution else 2.0


@bp.get("/favicon.ico")
def favicon():
    """Browsers ask for it on pages without a <link rel="icon"> (the JSON answers)."""
    return redirect(url_for("static", filename="favicon.svg"), code=301)


@bp.get("/predict")
@bp.get("/predict/batch")
def predict_get():
    return redirect(url_for("pages.index"))


def store_history(version: str) -> dict | None:
    """The store's promotion history (newest first) and the previously served version's figures."""
    store = current_app.extensions["model"].store
    if store is None:
        return None
    try:
        pointer = store.read_pointer()
    except StoreError:
        return None
    summaries = {row["version"]: row for row in store.versions()}
    earlier = [e["version"] for e in pointer.history if e["version"] != version]
    previous = summaries.get(earlier[-1]) if earlier else None
    events = [{**e, "trained_at": summaries.get(e["version"], {}).get("trained_at")} for e in reversed(pointer.history)]
    return {"events": events, "previous": previous, "serving_pointer": pointer.serving}


@bp.get("/model")
def model_card():
    checkpoint = get_predictor().checkpoint
    metrics = {split: m for split, m in checkpoint.metrics.items() if split in ("validation", "test")}
    return render_template(
        "model.html",
        model=checkpoint,
        metrics=metrics,
        history=store_history(checkpoint.version),
        gate_goals={name: goal.text for name, goal in GATE_GOALS.items()},
        roc_lines={name: roc_polyline(m.get("roc")) for name, m in metrics.items()},
        reliability={name: reliability_bars(m["calibration"]["bins"])
                     for name, m in metrics.items() if "calibration" in m},
        alignment=checkpoint.metrics.get("alignment"),
        aligned_films=aligned_films(get_predictor(), current_app.config["DATASET_DIR"]),
        robustness=checkpoint.metrics.get("robustness"),
        robustness_names=ROBUSTNESS_NAMES,
        site_shift=checkpoint.metrics.get("site_shift"),
    )


@lru_cache(maxsize=1)
def aligned_films(predictor, dataset_dir: str) -> list[dict] | None:
    """The test films the spatial transformer moves most, before and after, as inline PNGs.

    Read from the dataset folder (public films, never uploads); None without it. The
    same for every visit to the card of one model, so kept for the last one asked.
    """
    largest = predictor.checkpoint.metrics.get("alignment", {}).get("largest", [])
    root = Path(dataset_dir)
    paths = [dataset_file(root, film["file"]) for film in largest]
    if not largest or any(path is None for path in paths):
        return None
    inputs = np.stack([predictor.preprocess(path.read_bytes()) for path in paths])
    aligned = predictor.predict_many(inputs).aligned
    return [{**film, "input_uri": png_data_uri(before), "aligned_uri": png_data_uri(after)}
            for film, before, after in zip(largest, inputs, aligned)]


@bp.get("/healthz")
def healthz():
    """200 "ok"; 200 "degraded" with the ``problem`` while a working model serves in place of
    the one the store's pointer names (answers stay right; an admin has work); 503 when no
    model gives an answer."""
    predictor = get_predictor()
    loaded = predictor.works
    problem = current_app.extensions["model"].problem
    record_problem = current_app.extensions["cases"].health()
    status = "unavailable" if not loaded else "degraded" if problem or record_problem else "ok"
    body = {"status": status, "model_loaded": loaded, "model_version": predictor.version,
            "model_runtime": predictor.runtime, "record": "degraded" if record_problem else "ok"}
    if problem:
        body["problem"] = problem
    if record_problem:
        body["record_problem"] = record_problem
    return jsonify(body), 200 if loaded else 503
