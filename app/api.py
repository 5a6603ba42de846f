"""JSON API for other systems (PACS bridges, scripts), under /api/v1."""
from __future__ import annotations

import base64

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import BadRequest

from model import Prediction
from model.neighbours import COUNT_K

from .errors import status_for
from .render import saliency_empty, saliency_png
from .serving import clinic_probability, get_predictor, neighbour_index
from .uploads import form_value, predict_each, read_age, read_batch_upload, read_single_upload
from .worklist import answer_upload

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def wants_saliency() -> bool:
    text = request.args.get("saliency") or form_value(request, "saliency") or ""
    return text.lower() in ("1", "true", "yes", "on")


def wanted_neighbours() -> int | None:
    """``?neighbours=K``: the K (1 to 25) nearest training films; 400 otherwise."""
    text = request.args.get("neighbours")
    if text is None:
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if not 1 <= k <= COUNT_K:
        raise BadRequest(f"neighbours must be a whole number from 1 to {COUNT_K}, not {text[:20]!r}.")
    return k


def neighbours_json(prediction: Prediction, k: int) -> dict:
    index, problem = neighbour_index()
    if index is None:
        return {"neighbours": None, "neighbours_unavailable": problem}
    neighbours, pneumonia, _ = index.nearest(prediction.features, k)
    return {"neighbours": [n.to_dict() for n in neighbours], f"pneumonia_among_{COUNT_K}_nearest": pneumonia}


def prediction_json(prediction: Prediction) -> dict:
    """The answer for one film. A film outside the intended use gets no ``probability`` (and no
    ``label``): the network's numbers for it are kept under ``research``, out of a client's way."""
    scores = {"probability": round(prediction.probability, 6),
              "ood_score": None if prediction.ood_score is None else round(prediction.ood_score, 4)}
    body = {
        **(scores if prediction.in_distribution else {}),
        "label": prediction.label,  # null for a film outside the intended use: never a diagnosis
        "threshold": round(prediction.threshold, 6),
        "model_version": get_predictor().version,
        "in_distribution": prediction.in_distribution,
        "population_reasons": [reason.to_dict() for reason in prediction.population_reasons],
        "calibration_prevalence": get_predictor().checkpoint.calibration_prevalence,
    }
    if not prediction.in_distribution:
        body["research"] = {**scores, "note": "the network's output for a film outside its intended use: no answer"}
    at_clinic = clinic_probability(prediction.probability)
    if at_clinic is not None and prediction.in_distribution:
        body["clinic_prevalence"] = current_app.config["CLINIC_PREVALENCE"]
        body["probability_at_clinic_prevalence"] = round(at_clinic, 6)
    if prediction.saliency is not None:
        body["saliency_png"] = base64.b64encode(saliency_png(prediction.aligned, prediction.saliency)).decode("ascii")
        body["saliency_empty"] = saliency_empty(prediction.saliency)
    return body


@bp.post("/predict")
def predict():
    """One file (multipart ``image`` or the raw body; optionally ``age_years``) -> probability, decision, gate;
    with ``?neighbours=K`` also the K nearest training films."""
    k = wanted_neighbours()
    data, age = read_single_upload(request), read_age(request)
    answered = answer_upload(data, "api", age, saliency=wants_saliency())
    body = {"case_id": answered.case_id, **prediction_json(answered.prediction)}
    if k is not None:
        body.update(neighbours_json(answered.prediction, k))
    return jsonify(body)


@bp.post("/predict/batch")
def predict_batch():
    """Several files in ``images`` -> one result or one error per file, in upload order."""
    predictor = get_predictor()
    files = read_batch_upload(request, current_app.config["MAX_BATCH_FILES"])
    age = read_age(request)
    results = [
        {"filename": row["name"], "case_id": row["case_id"], **prediction_json(row["prediction"])}
        if "prediction" in row
        else {"filename": row["name"], "error": str(row["error"]), "status": status_for(row["error"])}
        for row in predict_each(predictor, files, age, "api")
    ]
    return jsonify(results=results, threshold=round(predictor.threshold, 6), model_version=predictor.version)

