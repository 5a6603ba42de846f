"""The case record in the app: recording each answer, the clinician's overread, the worklist
and its CSV export."""
from __future__ import annotations

import csv
import io

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from sqlalchemy import case as when
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from .answering import Answered, answer
from .cases import NOTE_LIMIT, READS, Case, CaseRecord, Delivery, Overread
from .serving import get_predictor

bp = Blueprint("cases", __name__)
api = Blueprint("cases_api", __name__, url_prefix="/api/v1")

PAGE_SIZE = 50
FILTERS = {
    "all": None,
    "awaiting": Case.overread.is_(None) & Case.decision.is_not(None),
    "pneumonia": Case.decision == "PNEUMONIA",
    "normal": Case.decision == "NORMAL",
    "refused": Case.decision.is_(None),
}
ORDERS = {"newest": (Case.created_at.desc(), Case.id.desc()),
          "suspicious": (Case.probability.desc(), Case.id.desc())}


def case_record() -> CaseRecord:
    return current_app.extensions["cases"]


def current_user() -> str | None:
    """The user the hospital's authenticating proxy names in ``TRUSTED_USER_HEADER``; trusted
    only behind that proxy, which must set the header itself on every request."""
    header = current_app.config.get("TRUSTED_USER_HEADER")
    return (request.headers.get(header) or "").strip()[:128] or None if header else None


def answer_upload(data: bytes, source: str, age_years: float | None, saliency: bool = False) -> Answered:
    """This request's film answered by this request's predictor, and its case recorded with its user."""
    return answer(get_predictor(), case_record(), data, source, age_years=age_years, user=current_user(),
                  saliency=saliency)


# ---- overread -----------------------------------------------------------------------


def read_overread(form) -> tuple[str, str | None]:
    read = form.get("read")
    read = read.strip().lower() if isinstance(read, str) else ""
    if read not in READS:
        abort(400, f"The read must be one of {', '.join(READS)}.")
    note = form.get("note")
    if note is not None and not isinstance(note, str):
        abort(400, "The note must be text.")
    if note is not None and len(note.strip()) > NOTE_LIMIT:
        abort(400, f"The note has {len(note.strip()):,} characters; a note may have at most {NOTE_LIMIT}.")
    return read, note


@bp.post("/cases/<case_id>/overread")
def overread(case_id: str):
    read, note = read_overread(request.form)
    if case_record().add_overread(case_id, read, note, current_user()) is None:
        abort(404, "There is no such case.")
    return redirect(url_for("cases.case_page", case_id=case_id))


@api.post("/cases/<case_id>/overread")
def overread_api(case_id: str):
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, 'Send a JSON object: {"read": "pneumonia" | "normal" | "uncertain", "note": "..."}.')
    read, note = read_overread(body)
    case = case_record().add_overread(case_id, read, note, current_user())
    if case is None:
        abort(404, "There is no such case.")
    return jsonify(case_json(case))


@api.get("/cases/<case_id>")
def case_api(case_id: str):
    case = case_record().case(case_id)
    if case is None:
        abort(404, "There is no such case.")
    return jsonify(case_json(case))


def case_json(case: Case) -> dict:
    return {
        "case_id": case.case_id, "created_at": case.created_at.isoformat(), "model_version": case.model_version,
        "source": case.source, "file_kind": case.file_kind, "probability": case.probability,
        "threshold": case.threshold, "decision": case.decision,
        "refusal": case.refusal.split(",") if case.refusal else [], "age_years": case.age_years,
        "overreads": [{"read": o.read, "note": o.note, "user": o.user, "at": o.at.isoformat()} for o in case.overreads],
        "reports": [{"state": d.state, "attempts": d.attempts, "error": d.last_error,
                     "delivered_at": d.done_at.isoformat() if d.state == "sent" and d.done_at else None}
                    for d in case.deliveries],
    }


# ---- the worklist -------------------------------------------------------------------


@bp.get("/cases/<case_id>")
def case_page(case_id: str):
    case = case_record().case(case_id)
    if case is None:
        abort(404, "There is no such case.")
    return render_template("case.html", case=case, reads=READS)


def chosen(name: str, options: dict) -> str:
    value = request.args.get(name, next(iter(options)))
    if value not in options:
        abort(400, f"{name} must be one of {', '.join(options)}.")
    return value


@bp.get("/cases")
def worklist():
    show, order = chosen("show", FILTERS), chosen("order", ORDERS)
    try:
        page = max(1, int(request.args.get("page", "1")))
    except ValueError:
        abort(400, "page must be a whole number.")
    delivery = (select(Delivery.state).where(Delivery.case_pk == Case.id).order_by(Delivery.id.desc()).limit(1)
                .scalar_subquery().label("delivery"))
    query = select(Case.case_id, Case.created_at, Case.model_version, Case.source, Case.probability,
                   Case.decision, Case.refusal, Case.overread, Case.age_years, delivery)
    if FILTERS[show] is not None:
        query = query.where(FILTERS[show])
    query = query.order_by(*ORDERS[order]).limit(PAGE_SIZE + 1).offset((page - 1) * PAGE_SIZE)
    with Session(case_record().engine) as session:
        rows = session.execute(query).all()
    return render_template("cases.html", rows=rows[:PAGE_SIZE], more=len(rows) > PAGE_SIZE, page=page, show=show,
                           order=order, filters=list(FILTERS), orders=list(ORDERS))


CSV_COLUMNS = ("case_id", "created_at", "model_version", "source", "file_kind", "input_sha256", "probability",
               "threshold", "decision", "refusal", "gate_score", "age_years", "user", "overread", "overread_note",
               "overread_at", "overread_by")
#: A spreadsheet runs a cell that starts so as a formula: free text (a note, a user's name) that does is
#: written behind a quote. Identifiers are ours and stay exact (a case id may start with "-").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
FREE_TEXT = frozenset(CSV_COLUMNS.index(name) for name in ("user", "overread_note", "overread_by"))


def csv_cell(column: int, value) -> str | float | int:
    if value is None:
        return ""
    if column in FREE_TEXT and isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_query():
    """Every case with its latest overread's note, time and reader; a refused case gives no probability
    (its number is for research only, and a column of them would read as answers)."""
    latest = (select(Overread.case_pk, func.max(Overread.id).label("id")).group_by(Overread.case_pk)
              .subquery())
    read = aliased(Overread)
    probability = when((Case.decision.is_(None), None), else_=Case.probability)
    columns = [getattr(Case, name) for name in CSV_COLUMNS[:-3]]
    columns[CSV_COLUMNS.index("probability")] = probability.label("probability")
    return (select(*columns, read.note, read.at, read.user)
            .outerjoin(latest, latest.c.case_pk == Case.id).outerjoin(read, read.id == latest.c.id))


@bp.get("/cases.csv")
def worklist_csv():
    """Every case (with the worklist's filter), for audit: no features, nothing of an image."""
    show = chosen("show", FILTERS)
    query = csv_query().order_by(Case.id)
    if FILTERS[show] is not None:
        query = query.where(FILTERS[show])
    engine = case_record().engine

    def lines():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        with engine.connect() as connection:
            for row in connection.execution_options(stream_results=True, yield_per=1000).execute(query):
                writer.writerow([csv_cell(column, value) for column, value in enumerate(row)])
                if buffer.tell() > 1 << 16:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    headers = {"Content-Disposition": 'attachment; filename="cases.csv"'}
    return Response(stream_with_context(lines()), mimetype="text/csv", headers=headers)

