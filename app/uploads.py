"""Uploads stay in memory: patient images are never written to disk, not even as temp files."""
from __future__ import annotations

import io
import logging
import math

from flask import Request, current_app, request
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from model import ImageError, Predictor, RequestBudget, UnreadableFileError

from .answering import answer_files
from .worklist import case_record, current_user

log = logging.getLogger("app")


class InMemoryRequest(Request):
    """Werkzeug spools file parts over 500 KB to a temporary file; keep them in RAM.

    ``MAX_CONTENT_LENGTH`` bounds what a request can hold.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


class UploadError(ImageError):
    """A request that carries no usable file; the message is for users."""


def _all_files(request: Request) -> list[FileStorage]:
    return [f for name in request.files for f in request.files.getlist(name)]


#: Bodies the API takes as the file itself, without multipart (which costs a parse).
RAW_TYPES = frozenset({"image/jpeg", "image/png", "application/dicom", "image/tiff", "image/bmp", "image/webp",
                       "application/octet-stream"})


def read_single_upload(request: Request, field: str = "image") -> bytes:
    """The bytes of exactly one uploaded file in ``field``, or the whole body when its
    Content-Type is an image type (``RAW_TYPES``): the same limits apply to both."""
    if request.mimetype in RAW_TYPES:
        data = request.get_data(cache=False)
        if request.max_content_length is not None and len(data) >= request.max_content_length:
            # A body sent chunked has no length to refuse up front: werkzeug stops reading at the limit.
            raise RequestEntityTooLarge()
        if not data:
            raise UploadError("The request body is empty: send the image itself as the body.")
        return data
    files = _all_files(request)
    chosen = request.files.getlist(field)
    if not files:
        raise UploadError(f"No file was uploaded: send one image in the form field '{field}'.")
    if len(files) > 1 or len(chosen) > 1:
        raise UploadError("Several files were uploaded: send exactly one image.")
    if not chosen:
        raise UploadError(f"The file must be sent in the form field '{field}'.")
    data = chosen[0].read()
    if not data:
        raise UploadError("The uploaded file is empty.")
    return data


def upload_name(request: Request, field: str = "image") -> str | None:
    """The uploaded file's name, to show back to the same user (never stored or logged);
    None for a raw body, which has none."""
    if request.mimetype in RAW_TYPES or field not in request.files:
        return None
    return display_name(request.files[field].filename, 1)


def form_value(request: Request, field: str) -> str | None:
    """A form or multipart field; a raw-body upload carries none, so its body is not parsed for one."""
    return None if request.mimetype in RAW_TYPES else request.form.get(field)


def read_batch_upload(request: Request, limit: int, field: str = "images") -> list[tuple[str, bytes]]:
    """(display name, bytes) of every file in ``field``: a part without a name is a row too,
    and an empty file stays in, to be refused in its row. Only a part with neither (what a
    browser sends for a file input left empty) is no file."""
    files = [(f.filename, f.read()) for f in request.files.getlist(field)]
    files = [(name, data) for name, data in files if name or data]
    if not files:
        raise UploadError(f"No files were uploaded: send one or more images in the form field '{field}'.")
    if len(files) > limit:
        raise UploadError(f"{len(files)} files were uploaded; a batch holds at most {limit}.")
    return [(display_name(name, i), data) for i, (name, data) in enumerate(files, 1)]


def display_name(filename: str | None, position: int) -> str:
    """The client's file name, shown back to the same user only (never stored or logged)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:120]
    return name or f"file {position}"


def read_age(request: Request, field: str = "age_years") -> float | None:
    """The patient's age in years from the form or multipart field (or, for a raw-body
    upload, the query string), if given; fractions allowed."""
    text = (form_value(request, field) or request.args.get(field) or "").strip()
    if not text:
        return None
    try:
        years = float(text.replace(",", "."))
    except ValueError:
        raise UploadError(f"The age must be a number of years (for example 4 or 1.5), not {text[:20]!r}.") from None
    if not math.isfinite(years) or years < 0 or years > 130:
        raise UploadError(f"The age must be between 0 and 130 years, not {text[:20]}.")
    return years


def predict_each(predictor: Predictor, files: list[tuple[str, bytes]], age_years: float | None,
                 source: str) -> list[dict]:
    """One row per file: ``{"name", "prediction", "case_id"}`` or, for a file that cannot be
    read, ``{"name", "error"}``.

    The films go through the network in one batch (``answering.answer_files``), within the
    request's budget of pixels and seconds: a file it cannot pay for is refused in its row.
    Each prediction is kept as a case (``source``: where it came from); ``case_id`` is None
    when the record could not take it.
    """
    config = current_app.config
    budget = RequestBudget(config["MAX_REQUEST_PIXELS"], config["REQUEST_BUDGET_S"])
    results = answer_files(predictor, case_record(), files, source, age_years=age_years, user=current_user(),
                           budget=budget)
    for position, result in enumerate(results, 1):
        if isinstance(result, UnreadableFileError):
            log_unreadable(result, f"file {position}")
    return [{"name": name, "error": result} if isinstance(result, ImageError)
            else {"name": name, "prediction": result.prediction, "case_id": result.case_id}
            for (name, _), result in zip(files, results)]


def log_unreadable(error: UnreadableFileError, which: str = "the file") -> None:
    """The request and the reader's failure class: never the file's name or bytes."""
    log.warning("%s %s: %s could not be read (%s)", request.method, request.path, which, error.cause)
