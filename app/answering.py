"""Answering a film and keeping its case: the one path of the pages, the API and the DICOM node.

Nothing here reads Flask's globals: the caller says which predictor answers (one per request,
so that the record names the version that computed the answer), which record keeps the case,
where the film came from and who sent it. A film the record cannot take is still answered;
its ``case_id`` is None.
"""
from __future__ import annotations

from dataclasses import dataclass

from model import ImageError, Prediction, Predictor

from .cases import Answer, CaseRecord, StudyLink


@dataclass(frozen=True)
class Answered:
    prediction: Prediction
    case_id: str | None
    version: str


def answer(predictor: Predictor, record: CaseRecord, data: bytes, source: str, *, age_years: float | None = None,
           user: str | None = None, saliency: bool = False, study: StudyLink | None = None) -> Answered:
    """Predict one film and record its case. Raises ``model.ImageError`` for a file that cannot be
    read (no case: an unreadable file is no prediction)."""
    prediction = predictor.predict(data, saliency=saliency, age_years=age_years)
    case_id = record.record(data, Answer.of(prediction), predictor.version, source, age_years, user, study=study)
    return Answered(prediction, case_id, predictor.version)


def answer_files(predictor: Predictor, record: CaseRecord, files: list[tuple[str, bytes]], source: str, *,
                 age_years: float | None, user: str | None, budget) -> list[Answered | ImageError]:
    """Several films through the network in one batch (``Predictor.predict_files``, within
    ``budget``), the answered films recorded in one transaction; an ``ImageError`` in the place of
    each file that could not be read or paid for."""
    results = predictor.predict_files([data for _, data in files], age_years, budget)
    answered = [(data, result) for (_, data), result in zip(files, results) if not isinstance(result, ImageError)]
    case_ids = iter(record.record_many([(data, Answer.of(result), None) for data, result in answered],
                                       predictor.version, source, age_years, user))
    return [result if isinstance(result, ImageError) else Answered(result, next(case_ids), predictor.version)
            for result in results]
