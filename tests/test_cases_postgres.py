"""The case record against a real PostgreSQL that the tests start themselves (Debian's
package; .ci/run installs it): the same record, two app servers writing to one database
under load, and the database going down and coming back."""
import json
import threading
import time
import urllib.request
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.cases import Case
from harness.images import encode, synthetic_xray
from harness.server import gunicorn, post_image
from tests.client import Uploads

pytestmark = pytest.mark.slow
XRAY = encode(synthetic_xray(400, 320), ".png")


@pytest.fixture
def server(postgresql_server):
    return postgresql_server


@pytest.fixture
def database(server) -> str:
    return server.database(f"cases_{uuid.uuid4().hex[:12]}")


def test_the_record_on_postgresql(make_app, database, pediatric_film):
    app = make_app(DATABASE_URL=database)
    uploads = Uploads(app.test_client())
    case_id = uploads.api(pediatric_film).get_json()["case_id"]
    uploads.batch_form([(pediatric_film, "a.jpeg"), (XRAY, "b.png")])
    assert uploads.client.post(f"/api/v1/cases/{case_id}/overread", json={"read": "pneumonia"}).status_code == 200
    with Session(app.extensions["cases"].engine) as session:
        rows = session.scalars(select(Case).order_by(Case.id)).all()
    assert [row.source for row in rows] == ["api", "batch", "batch"] and rows[0].overread == "pneumonia"
    assert case_id[:8] in uploads.client.get("/cases?order=suspicious").get_data(as_text=True)
    assert uploads.client.get("/cases.csv").get_data(as_text=True).count("\n") == 4
    monitor = uploads.client.get("/api/v1/monitor").get_json()
    assert sum(n for _, n in monitor["cases_per_day"]) == 3 and monitor["agreement"]["overreads"] == 1
    assert uploads.client.get("/monitor").status_code == 200


def test_two_servers_writing_to_one_database_under_load_lose_no_case(database):
    env = {"DATABASE_URL": database, "GUNICORN_THREADS": "4"}
    with gunicorn(workers=2, env=env) as (first, _), gunicorn(workers=2, env=env) as (second, _):
        answers, errors = [], []

        def client(base):
            for _ in range(40):
                try:
                    status, body = post_image(base, XRAY, timeout=30)
                    answers.append((status, body.get("case_id")))
                except OSError as error:
                    errors.append(repr(error))

        threads = [threading.Thread(target=client, args=(base,)) for base in (first, second) * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == [] and len(answers) == 320 and {status for status, _ in answers} == {200}
    recorded = {case_id for _, case_id in answers}
    assert None not in recorded and len(recorded) == 320
    from app.cases import CaseRecord

    assert CaseRecord(database).count() == 320


def test_a_database_that_goes_down_fails_no_prediction_and_recording_resumes(server, database):
    with gunicorn(workers=1, env={"DATABASE_URL": database}) as (base, _):
        assert post_image(base, XRAY)[1]["case_id"] is not None
        server.stop()
        try:
            down = [post_image(base, XRAY, timeout=30) for _ in range(3)]
            health = json.loads(urllib.request.urlopen(base + "/healthz", timeout=10).read())
        finally:
            server.start()
        assert [status for status, _ in down] == [200] * 3 and [b["case_id"] for _, b in down] == [None] * 3
        assert health["record"] == "degraded" and health["model_loaded"] is True
        deadline = time.monotonic() + 15
        while post_image(base, XRAY)[1]["case_id"] is None:
            assert time.monotonic() < deadline, "recording did not resume"
            time.sleep(0.5)
        health = json.loads(urllib.request.urlopen(base + "/healthz", timeout=10).read())
        assert health["record"] == "ok"


def test_a_case_is_committed_durably_on_postgresql(database):
    from app.cases import make_engine

    with make_engine(database).connect() as connection:
        assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    with make_engine(database, durable=False).connect() as connection:  # what bench.cases compares it with
        assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
