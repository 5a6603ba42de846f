"""The clinician's pages: upload, result and the model card."""
from __future__ import annotations

from flask import Blueprint, current_app, redirect, render_template, request, url_for

from . import get_predictor
from .render import png_data_uri, roc_polyline
from .uploads import read_single_upload

bp = Blueprint("pages", __name__)

ACCEPTED_FORMATS = "JPEG, PNG (8- or 16-bit), TIFF, BMP, WebP"


def upload_limits() -> dict:
    return {
        "formats": ACCEPTED_FORMATS,
        "max_mb": current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024),
        "max_megapixels": current_app.config["MAX_IMAGE_PIXELS"] / 1e6,
    }


@bp.get("/")
def index():
    return render_template("index.html", limits=upload_limits(), model=get_predictor().checkpoint)


@bp.post("/predict")
def predict():
    predictor = get_predictor()
    prediction = predictor.predict(read_single_upload(request))
    return render_template(
        "result.html",
        prediction=prediction,
        percent=100 * prediction.probability,
        input_uri=png_data_uri(prediction.model_input),
        aligned_uri=png_data_uri(prediction.aligned),
        model=predictor.checkpoint,
        test_metrics=predictor.checkpoint.metrics.get("test", {}),
    )


@bp.get("/predict")
def predict_get():
    return redirect(url_for("pages.index"))


@bp.get("/model")
def model_card():
    checkpoint = get_predictor().checkpoint
    metrics = checkpoint.metrics
    return render_template(
        "model.html",
        model=checkpoint,
        metrics=metrics,
        roc_lines={name: roc_polyline(m.get("roc")) for name, m in metrics.items()},
    )
