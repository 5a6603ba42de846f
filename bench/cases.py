"""The case record's cost (issue 32's goals), SQLite and PostgreSQL in one run.

    python -m bench.cases [--cases 1000000] [--rounds 300] [--skip-postgres]

Prints:
- what recording adds to an API prediction's median: the same app, the record's write
  timed in and out by turns, round after round (goal: <= 1 ms);
- one case's write with the relaxed settings kept before and with durable commits (shipped),
  interleaved;
- a load run, 2 gunicorn workers x 4 threads under 8 clients for 20 s: requests answered,
  cases recorded, errors (goal: as many cases as answers, 0 errors);
- with ``--cases`` cases in the database: the worklist's first page, /monitor, and the
  bytes a case takes (goals: < 300 ms, < 1 s, < 1.5 KB).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

from harness.images import encode, synthetic_xray
from harness.postgres import binaries, postgres
from harness.server import gunicorn, post_image

XRAY = encode(synthetic_xray(400, 320), ".png")


def make_app(url: str):
    from app import create_app

    return create_app({"TESTING": True, "SECRET_KEY": "bench", "DATABASE_URL": url})


def recording_overhead(url: str, rounds: int) -> tuple[float, float]:
    """Median API prediction (ms) without and with the record's write, interleaved."""
    app = make_app(url)
    client, record = app.test_client(), app.extensions["cases"]
    real = record.record
    times = {False: [], True: []}
    for i in range(rounds + 20):
        for recording in (False, True):
            record.record = real if recording else (lambda *args, **kwargs: None)
            started = time.perf_counter()
            response = client.post("/api/v1/predict", data=XRAY, content_type="image/png")
            elapsed = time.perf_counter() - started
            assert response.status_code == 200
            if i >= 20:
                times[recording].append(elapsed * 1000)
    record.record = real
    return statistics.median(times[False]), statistics.median(times[True])


def durability_cost(url: str, rounds: int) -> tuple[float, float]:
    """Median ms of one case's write, relaxed (the settings kept before) and durable (shipped),
    interleaved write by write on the same database."""
    from app.cases import Answer, CaseRecord, make_engine

    answer = Answer(0.5, 0.5, "NORMAL", None, 0.1, np.zeros(64, np.float32))
    records = {}
    for durable in (False, True):
        records[durable] = CaseRecord(url)
        records[durable]._engine, records[durable]._pid = make_engine(url, durable=durable), os.getpid()
        records[durable].migrate()
    times = {False: [], True: []}
    for i in range(rounds + 20):
        for durable in (False, True):
            started = time.perf_counter()
            assert records[durable].record(XRAY, answer, "bench", "api", None, None) is not None
            if i >= 20:
                times[durable].append((time.perf_counter() - started) * 1000)
    return statistics.median(times[False]), statistics.median(times[True])


def load(url: str, seconds: float = 20) -> tuple[int, int, int]:
    """(answers, cases recorded, errors) of 8 clients against 2 workers x 4 threads."""
    from app.cases import CaseRecord

    record = CaseRecord(url)
    record.migrate()
    before = record.count()
    answers, errors, stop = [], [], time.monotonic() + seconds

    def client():
        while time.monotonic() < stop:
            try:
                status, body = post_image(gunicorn_base, XRAY, timeout=30)
                answers.append(status == 200 and body.get("case_id") is not None)
            except OSError as error:
                errors.append(error)

    with gunicorn(workers=2, env={"DATABASE_URL": url, "GUNICORN_THREADS": "4"}) as (gunicorn_base, _):
        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return len(answers), record.count() - before, len(errors) + answers.count(False)


def fill(url: str, count: int, version: str, threshold: float) -> None:
    """``count`` cases over the last 60 days for ``version``: 3% refused, a tenth overread."""
    from app.cases import Case, CaseRecord

    record = CaseRecord(url)
    record.migrate()
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.UTC)
    chunk = 20_000
    with record.engine.begin() as connection:
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            probability = rng.beta(0.7, 0.5, n)
            refused = rng.random(n) < 0.03
            read = rng.random(n) < 0.1
            seconds = np.sort(rng.uniform(0, 60 * 86400, n))[::-1]
            rows = [{
                "case_id": f"bench{start + i:011d}{rng.integers(1 << 30):09d}",
                "created_at": now - dt.timedelta(seconds=float(seconds[i])),
                "model_version": version, "source": "api", "file_kind": "jpeg", "input_sha256": f"{start + i:064x}",
                "probability": float(probability[i]), "threshold": threshold,
                "decision": None if refused[i] else "PNEUMONIA" if probability[i] >= threshold else "NORMAL",
                "refusal": "image" if refused[i] else None, "gate_score": float(rng.random()),
                "features": rng.standard_normal(128).astype(np.float16).tobytes(), "age_years": None, "user": None,
                "overread": ("pneumonia" if probability[i] > 0.5 else "normal") if read[i] and not refused[i] else None,
            } for i in range(n)]
            connection.execute(Case.__table__.insert(), rows)


def size_per_case(url: str, count: int) -> float:
    from app.cases import CaseRecord

    engine = CaseRecord(url).engine
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            total = connection.execute(text("SELECT pg_total_relation_size('cases') + "
                                            "pg_total_relation_size('overreads')")).scalar()
        else:
            connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            total = Path(url.split("///", 1)[1]).stat().st_size
    return total / count


def page_times(url: str, rounds: int = 5) -> tuple[float, float]:
    app = make_app(url)
    client = app.test_client()
    worklist, monitor = [], []
    for _ in range(rounds):
        for path, times in (("/cases", worklist), ("/monitor", monitor)):
            started = time.perf_counter()
            assert client.get(path).status_code == 200
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(worklist), statistics.median(monitor)


def run(label: str, url: str, args) -> None:
    without, with_record = recording_overhead(url, args.rounds)
    print(f"{label}: API prediction median {without:.2f} ms without the record, {with_record:.2f} ms with it "
          f"(+{with_record - without:.2f} ms)")
    relaxed, durable = durability_cost(url, args.rounds)
    print(f"{label}: one case's write, median {relaxed:.2f} ms relaxed (before), {durable:.2f} ms durable "
          f"(+{durable - relaxed:.2f} ms)")
    answers, recorded, errors = load(url)
    print(f"{label}: load, 2 workers x 4 threads, 8 clients, 20 s: {answers} answers, {recorded} cases, "
          f"{errors} errors")
    from model import load_checkpoint
    from model.settings import DEFAULT_CHECKPOINT

    bundled = load_checkpoint(DEFAULT_CHECKPOINT)
    started = time.perf_counter()
    fill(url, args.cases, bundled.version, bundled.threshold)
    filled = time.perf_counter() - started
    worklist, monitor = page_times(url)
    print(f"{label}: {args.cases:,} cases (filled in {filled:.0f} s): /cases first page {worklist:.0f} ms, "
          f"/monitor {monitor:.0f} ms, {size_per_case(url, args.cases):.0f} bytes a case")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as each gunicorn worker runs (gunicorn.conf.py): no spinning threads
    folder = Path(tempfile.mkdtemp(prefix="bench-cases-"))
    os.environ["PNEUMONIA_MODEL_STORE"] = str(folder / "store")
    run("SQLite", f"sqlite:///{folder / 'cases.sqlite3'}", args)
    if not args.skip_postgres:
        if binaries() is None:
            print("PostgreSQL: not installed (apt-get install postgresql)")
        else:
            with postgres() as server:
                run("PostgreSQL", server.database("bench"), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
