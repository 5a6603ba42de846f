"""The case record, on SQLite and on PostgreSQL: what each answer leaves, the overread, the
worklist, failure and retention. (tests/test_cases_postgres.py: several servers, outages.)"""
import csv
import datetime as dt
import io
import re
import time
import uuid

import numpy as np
import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.cases import Case, CaseRecord
from harness.dicom_files import PATIENT_ID, PATIENT_NAME, make_dicom, twelve_bit
from harness.images import encode, synthetic_xray
from tests.client import CSRF, Uploads, network_probability


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Each record test runs on SQLite and on a PostgreSQL server the tests start."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cases.sqlite3'}"
    return request.getfixturevalue("postgresql_server").database(f"cases_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def record_app(make_app, database_url):
    return make_app(DATABASE_URL=database_url, TRUSTED_USER_HEADER="X-Remote-User")


@pytest.fixture
def uploads(record_app) -> Uploads:
    return Uploads(record_app.test_client())


def cases(app) -> list[Case]:
    with Session(app.extensions["cases"].engine) as session:
        return list(session.scalars(select(Case).order_by(Case.id)))


def test_the_schema_is_alembics(record_app):
    engine = record_app.extensions["cases"].engine
    assert {"cases", "overreads", "alembic_version"} <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    assert "ix_cases_version_overread" in {index["name"] for index in inspect(engine).get_indexes("cases")}


def test_every_answer_leaves_one_case_with_its_id_and_nothing_of_the_image(uploads, record_app, pediatric_film):
    dicom = make_dicom(twelve_bit(synthetic_xray(400, 320)), tags={"PatientAge": "003Y"})
    api = uploads.api(pediatric_film, "secret-name.jpeg", age_years="2").get_json()
    page = uploads.form(dicom, "Doe_Jane.dcm").get_data(as_text=True)
    batch = uploads.batch_api([(pediatric_film, "a.jpeg"), (b"not an image", "b.txt")]).get_json()["results"]
    uploads.batch_form([(pediatric_film, "c.jpeg")])
    rows = cases(record_app)
    assert [row.source for row in rows] == ["api", "page", "api", "batch"]  # the unreadable file is no case
    first = rows[0]
    assert api["case_id"] == first.case_id and len(first.case_id) >= 20
    assert first.probability == pytest.approx(network_probability(api), abs=1e-6) and first.decision == api["label"]
    assert first.file_kind == "jpeg" and first.age_years == 2 and len(first.features) == 128 * 2
    assert rows[1].file_kind == "dicom" and rows[1].case_id in page and 'id="case-id"' in page
    assert batch[0]["case_id"] == rows[2].case_id and "case_id" not in batch[1]
    # every column but the features, whose bytes may spell anything (they hold numbers alone: checked above)
    dump = "\n".join(str({k: v for k, v in vars(row).items() if k != "features"}) for row in rows)
    for secret in ("secret-name", "Doe", PATIENT_NAME, PATIENT_ID, "a.jpeg", "c.jpeg"):
        assert secret not in dump


def test_a_refused_film_is_recorded_with_its_reasons(uploads, record_app):
    noise = encode(synthetic_xray(300, 300, seed=1)[::-1], ".png")
    body = uploads.api(noise, age_years="40").get_json()
    (row,) = cases(record_app)
    assert body["label"] is None and row.decision is None and row.case_id == body["case_id"]
    assert set(row.refusal.split(",")) == {r["check"] for r in body["population_reasons"]}


def test_the_user_comes_from_the_trusted_header_only_when_configured(record_app, make_app, tmp_path, pediatric_film):
    client = record_app.test_client()
    client.post("/api/v1/predict", data=pediatric_film, content_type="image/jpeg", headers={"X-Remote-User": "dr.a"})
    assert cases(record_app)[0].user == "dr.a"
    plain = make_app(DATABASE_URL=f"sqlite:///{tmp_path / 'other.sqlite3'}")
    plain.test_client().post("/api/v1/predict", data=pediatric_film, content_type="image/jpeg",
                             headers={"X-Remote-User": "dr.a"})
    assert cases(plain)[0].user is None


def test_an_overread_in_one_click_kept_as_history(uploads, record_app, pediatric_film):
    page = uploads.form(pediatric_film).get_data(as_text=True)
    case_id = re.search(r'id="case-id">Case <a href="/cases/([\w-]+)"', page).group(1)
    token = CSRF.search(page).group(1)
    client = uploads.client
    answer = client.post(f"/cases/{case_id}/overread", data={"csrf_token": token, "read": "pneumonia", "note": "RLL"})
    assert answer.status_code == 302 and answer.headers["Location"].endswith(f"/cases/{case_id}")
    changed = client.post(f"/api/v1/cases/{case_id}/overread", json={"read": "uncertain"},
                          headers={"X-Remote-User": "dr.b"})
    assert changed.status_code == 200
    assert [(o["read"], o["note"], o["user"]) for o in changed.get_json()["overreads"]] == [
        ("pneumonia", "RLL", None), ("uncertain", None, "dr.b")]
    html = client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert html.count("<tr>") == 3 and "RLL" in html and "dr.b" in html
    assert cases(record_app)[0].overread == "uncertain"


@pytest.mark.parametrize("how, status", [("no csrf", 400), ("bad read", 400), ("unknown case", 404),
                                         ("api bad read", 400), ("api unknown", 404), ("api not json", 400)])
def test_overread_refusals(uploads, pediatric_film, how, status):
    case_id = uploads.api(pediatric_film).get_json()["case_id"]
    client, token = uploads.client, uploads.csrf_token()
    response = {
        "no csrf": lambda: client.post(f"/cases/{case_id}/overread", data={"read": "normal"}),
        "bad read": lambda: client.post(f"/cases/{case_id}/overread", data={"csrf_token": token, "read": "maybe"}),
        "unknown case": lambda: client.post("/cases/nope/overread", data={"csrf_token": token, "read": "normal"}),
        "api bad read": lambda: client.post(f"/api/v1/cases/{case_id}/overread", json={"read": 3}),
        "api unknown": lambda: client.post("/api/v1/cases/nope/overread", json={"read": "normal"}),
        "api not json": lambda: client.post(f"/api/v1/cases/{case_id}/overread", data="read=normal"),
    }[how]()
    assert response.status_code == status


def test_the_worklist_filters_orders_pages_and_exports(uploads, record_app, pediatric_film, monkeypatch):
    import app.worklist

    monkeypatch.setattr(app.worklist, "PAGE_SIZE", 2)
    films = [pediatric_film, encode(synthetic_xray(300, 300, seed=2)[::-1], ".png"), pediatric_film]
    ids = [uploads.api(film).get_json()["case_id"] for film in films]
    client = uploads.client
    newest = client.get("/cases").get_data(as_text=True)
    assert newest.index(ids[2][:8]) < newest.index(ids[1][:8]) and ids[0][:8] not in newest and "Next page" in newest
    assert ids[0][:8] in client.get("/cases?page=2").get_data(as_text=True)
    refused = client.get("/cases?show=refused").get_data(as_text=True)
    assert ids[1][:8] in refused and ids[0][:8] not in refused
    client.post(f"/api/v1/cases/{ids[0]}/overread", json={"read": "normal"})
    awaiting = client.get("/cases?show=awaiting").get_data(as_text=True)
    assert ids[2][:8] in awaiting and ids[0][:8] not in awaiting and ids[1][:8] not in awaiting
    assert client.get("/cases?show=everything").status_code == 400
    exported = list(csv.DictReader(io.StringIO(client.get("/cases.csv").get_data(as_text=True))))
    assert [row["case_id"] for row in exported] == ids and exported[0]["overread"] == "normal"
    uploads.api(pediatric_film, age_years="3")
    listed = client.get("/cases").get_data(as_text=True)
    assert "<td data-label=\"Age\">3 y</td>" in listed and "<td data-label=\"From\">api</td>" in listed
    assert "features" not in exported[0] and exported[1]["decision"] == ""


def test_the_export_keeps_the_read_s_note_time_and_reader_and_no_probability_for_a_refusal(uploads, record_app,
                                                                                            pediatric_film):
    client = uploads.client
    answered = uploads.api(pediatric_film).get_json()["case_id"]
    refused = uploads.api(pediatric_film, age_years="40").get_json()["case_id"]
    client.post(f"/api/v1/cases/{answered}/overread", json={"read": "normal", "note": "=HYPERLINK(\"x\")"},
                headers={"X-Remote-User": "dr.a"})
    client.post(f"/api/v1/cases/{answered}/overread", json={"read": "pneumonia", "note": "RLL, on review"},
                headers={"X-Remote-User": "dr.b"})
    client.post(f"/api/v1/cases/{refused}/overread", json={"read": "pneumonia", "note": "+1 opacity"})
    rows = {row["case_id"]: row for row in csv.DictReader(io.StringIO(client.get("/cases.csv").get_data(as_text=True)))}
    assert rows[answered]["overread_note"] == "RLL, on review" and rows[answered]["overread_by"] == "dr.b"
    assert rows[answered]["overread_at"] and float(rows[answered]["probability"]) > 0
    assert rows[refused]["probability"] == "" and rows[refused]["refusal"] == "age"
    assert rows[refused]["overread_note"] == "'+1 opacity"  # a spreadsheet would run it as a formula


def test_only_free_text_is_neutralised_in_the_export_a_case_id_stays_exact():
    from app.worklist import CSV_COLUMNS, csv_cell

    assert csv_cell(CSV_COLUMNS.index("case_id"), "-1-hoRw6Vvp") == "-1-hoRw6Vvp"  # token_urlsafe may start so
    assert csv_cell(CSV_COLUMNS.index("overread_note"), "-1 opacity") == "'-1 opacity"
    assert csv_cell(CSV_COLUMNS.index("overread_by"), "@admin") == "'@admin"


def test_a_note_over_the_limit_is_refused_naming_the_limit_never_cut(uploads, record_app, pediatric_film):
    case_id = uploads.api(pediatric_film).get_json()["case_id"]
    answer = uploads.client.post(f"/api/v1/cases/{case_id}/overread", json={"read": "normal", "note": "x" * 5000})
    assert answer.status_code == 400 and "at most 500" in answer.get_json()["error"]
    assert uploads.client.get(f"/api/v1/cases/{case_id}").get_json()["overreads"] == []


def test_a_database_that_fails_never_fails_a_prediction_and_recording_resumes(uploads, record_app, pediatric_film,
                                                                             monkeypatch):
    import app.cases

    record = record_app.extensions["cases"]
    working = record.engine

    class Down:
        def connect(self):
            raise OperationalError("INSERT", {}, Exception("database is locked or gone"))

    monkeypatch.setattr(app.cases.CaseRecord, "engine", property(lambda self: Down()))
    api = uploads.api(pediatric_film)
    page = uploads.form(pediatric_film).get_data(as_text=True)
    assert api.status_code == 200 and api.get_json()["case_id"] is None
    assert 0 <= network_probability(api.get_json()) <= 1
    assert 'id="not-recorded"' in page and 'id="overread"' not in page
    health = uploads.client.get("/healthz").get_json()
    assert health["status"] == "degraded" and health["record"] == "degraded" and health["model_loaded"]
    monkeypatch.setattr(app.cases.CaseRecord, "engine", property(lambda self: working))
    monkeypatch.setattr(app.cases, "RETRY_S", 0.0)
    record._retry_after = 0.0
    assert uploads.client.get("/healthz").get_json()["record"] == "ok"  # asked again, before any write
    assert uploads.api(pediatric_film).get_json()["case_id"] is not None and len(cases(record_app)) == 1


def test_an_unreachable_database_at_start_up_leaves_the_app_serving(make_app, pediatric_film):
    app = make_app(DATABASE_URL="sqlite:////proc/no-such-place/cases.sqlite3")
    response = app.test_client().post("/api/v1/predict", data=pediatric_film, content_type="image/jpeg")
    assert response.status_code == 200 and response.get_json()["case_id"] is None
    assert app.test_client().get("/healthz").get_json()["record"] == "degraded"


def test_prune_deletes_old_cases_and_says_so_in_the_log(uploads, record_app, pediatric_film, caplog):
    old, new = (uploads.api(pediatric_film).get_json()["case_id"] for _ in range(2))
    uploads.client.post(f"/api/v1/cases/{old}/overread", json={"read": "normal"})
    with record_app.extensions["cases"].engine.begin() as connection:
        connection.execute(update(Case).where(Case.case_id == old)
                           .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=40)))
    result = record_app.test_cli_runner().invoke(args=["prune-cases", "--older-than-days", "30"])
    assert result.exit_code == 0 and "deleted 1 cases" in result.output
    assert "pruned 1 cases older than 30 days" in caplog.text
    assert [row.case_id for row in cases(record_app)] == [new]
    assert uploads.client.get(f"/cases/{old}").status_code == 404


def test_the_record_writes_from_many_threads_without_losing_a_case(tmp_path):

    from app.cases import Answer

    record, answer = fresh_record(tmp_path), Answer(0.7, 0.5, "PNEUMONIA", None, 0.2, None)
    ids = []

    def write():
        for _ in range(50):
            ids.append(record.record(b"\xff\xd8data", answer, "v", "api", None, None))

    in_threads(write, 8)
    assert None not in ids and len(set(ids)) == 400 and record.count() == 400


def test_recent_cases_sit_on_the_analysis_map_where_their_star_would(uploads, record_app, pediatric_film):
    from model.neighbours import NeighbourIndex
    from model.settings import DEFAULT_TSNE_ARTIFACT
    from model.tsne_map import TsneMap

    assert 'id="no-recent-cases"' in uploads.client.get("/analysis").get_data(as_text=True)
    case_id = uploads.api(pediatric_film).get_json()["case_id"]
    uploads.client.post(f"/api/v1/cases/{case_id}/overread", json={"read": "pneumonia"})
    html = uploads.client.get("/analysis").get_data(as_text=True)
    assert 'id="recent-cases-map"' in html and "read pneumonia" in html and "The last 1 cases" in html
    index = NeighbourIndex(TsneMap.load(DEFAULT_TSNE_ARTIFACT))
    prediction = record_app.extensions["model"].predictor.predict(pediatric_film)
    features = np.frombuffer(cases(record_app)[0].features, np.float16).astype(np.float32)
    assert tuple(index.place(features)[0]) == pytest.approx(index.nearest(features, 1)[2], abs=1e-6)
    assert tuple(index.place(prediction.features)[0]) == index.nearest(prediction.features, 1)[2]


def test_a_record_made_by_an_older_version_is_migrated_at_start_up_with_its_cases(tmp_path, make_app):
    from alembic import command
    from alembic.config import Config

    from app.cases import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.cmd_opts = None
    engine = CaseRecord(url).engine
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(text("INSERT INTO cases (case_id, created_at, model_version, source, file_kind, "
                                "input_sha256) VALUES ('old-case', '2026-12-01 10:00:00', 'v0', 'api', 'png', 'x')"))
    app = make_app(DATABASE_URL=url)
    with app.extensions["cases"].engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    assert app.test_client().get("/api/v1/cases/old-case").get_json()["model_version"] == "v0"


def test_a_case_is_committed_durably_on_sqlite(tmp_path):
    from app.cases import make_engine

    url = f"sqlite:///{tmp_path / 'cases.sqlite3'}"
    with make_engine(url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: a commit waits for the disk
    with make_engine(url, durable=False).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL, as before


def test_a_batch_is_written_in_one_statement_and_one_commit(uploads, record_app, pediatric_film):
    """A batch pays for one durable commit, not one a film (issue 46: the batch's share of the cost)."""
    from sqlalchemy import event

    engine = record_app.extensions["cases"].engine
    inserts = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO CASES"):
            inserts.append(executemany)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        batch = uploads.batch_api([(pediatric_film, "a.jpeg"), (pediatric_film, "b.jpeg"),
                                   (b"not an image", "c.txt")]).get_json()["results"]
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(inserts) == 1 and inserts[0]  # one statement for both answered films
    assert [("case_id" in row) for row in batch] == [True, True, False]
    assert {row.case_id for row in cases(record_app)} == {batch[0]["case_id"], batch[1]["case_id"]}


def test_answers_recorded_together_share_a_commit_and_a_bad_row_fails_alone(tmp_path):
    import threading

    from sqlalchemy import event

    from app.cases import Answer

    record, answer = fresh_record(tmp_path), Answer(0.7, 0.5, "PNEUMONIA", None, 0.2, None)
    statements, ids, started = [], [], threading.Barrier(8)
    event.listen(record.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: statements.append(statement)
                 if statement.lstrip().upper().startswith("INSERT INTO CASES") else None)
    slow = record._insert

    def insert(rows):  # a slow disk: the threads that arrive meanwhile queue behind the first
        time.sleep(0.05)
        return slow(rows)

    record._insert = insert

    def write():
        started.wait()
        ids.append(record.record(b"\xff\xd8data", answer, "v", "api", None, None))

    in_threads(write, 8)
    assert None not in ids and record.count() == 8 and len(statements) < 8
    duplicate = record._row(b"\xff\xd8", answer, "v", "api", None, None, None)
    record._insert([dict(duplicate)])
    results = record._insert_together([dict(duplicate), record._row(b"\xff\xd8", answer, "v", "api", None, None,
                                                                    None)])
    assert isinstance(results[0], Exception) and results[1] is None and record.count() == 10


def fresh_record(folder) -> CaseRecord:
    record = CaseRecord(f"sqlite:///{folder / 'cases.sqlite3'}")
    record.migrate()
    return record


def in_threads(target, count: int) -> None:
    """Run ``target`` on ``count`` threads at once and wait for them all."""
    import threading

    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
