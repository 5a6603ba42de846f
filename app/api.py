"""JSON API for other systems (PACS bridges, scripts) and the health check."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from . import get_predictor
from .uploads import read_single_upload

bp = Blueprint("api", __name__)


@bp.post("/api/v1/predict")
def predict():
    """multipart/form-data with one file in ``image`` -> probability and decision."""
    predictor = get_predictor()
    prediction = predictor.predict(read_single_upload(request))
    return jsonify(
        probability=round(prediction.probability, 6),
        label=prediction.label,
        threshold=round(prediction.threshold, 6),
        model_version=predictor.version,
    )


@bp.get("/healthz")
def healthz():
    predictor = get_predictor()
    return jsonify(status="ok", model_loaded=predictor is not None, model_version=predictor.version)
