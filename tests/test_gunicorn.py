"""Smoke tests of the real server: gunicorn with the bundled model on a loopback port."""
import subprocess
import sys
import threading

import psutil
import pytest

from harness.images import encode, synthetic_xray
from harness.server import ROOT, gunicorn, post_image
from tests.client import network_probability
from training import train

pytestmark = pytest.mark.slow


def test_gunicorn_serves_predictions(tmp_path):
    xray = encode(synthetic_xray(500, 400), ".jpg")
    home = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}  # where gunicorn puts its control socket
    with gunicorn(workers=1, env=home) as (base, _):
        status, body = post_image(base, xray)
        assert status == 200
        assert 0 <= network_probability(body) <= 1
        assert body["label"] in ("NORMAL", "PNEUMONIA") if body["in_distribution"] else body["label"] is None
        status, body = post_image(base, b"not an image")
        assert status == 415 and "error" in body
        status, body = post_image(base, xray)  # still serving after a refusal
        assert status == 200
        assert list(tmp_path.rglob("*.ctl")) == []  # no control socket shared by every instance on the host


def test_concurrent_requests_in_one_worker_each_get_their_own_answer():
    """The worker's threads share forward passes (model/coalesce.py): no answer may land on another request."""
    films = [encode(synthetic_xray(500 + 20 * i, 400, seed=i), ".jpg") for i in range(6)] + [b"not an image"] * 2
    with gunicorn(workers=1) as (base, _):
        alone = [post_image(base, film) for film in films]
        together: list = [None] * len(films)

        def send(i):
            together[i] = [post_image(base, films[i]) for _ in range(3)]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(films))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len({network_probability(body) for status, body in alone if status == 200}) == 6  # six different films
    for (status, body), answers in zip(alone, together):
        for answer_status, answer in answers:
            assert answer_status == status
            if status == 200:
                assert network_probability(answer) == pytest.approx(network_probability(body), abs=1e-5)
                assert answer["label"] == body["label"]
            else:
                assert status == 415 and "error" in answer


def test_gunicorn_refuses_to_start_on_a_truncated_checkpoint(tmp_path):
    bundled = (ROOT / "model" / "weights" / "pneumonia_stn.pt").read_bytes()
    broken = tmp_path / "truncated.pt"
    broken.write_bytes(bundled[: len(bundled) // 3])
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        env={"PNEUMONIA_CHECKPOINT": str(broken), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "cannot start" in result.stderr and "truncated or corrupt" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("settings", [{"GUNICORN_PRELOAD": "1", "GUNICORN_MAX_REQUESTS": "60"},
                                      {"GUNICORN_PRELOAD": "0"}], ids=["preload-recycling", "no-preload"])
def test_promotion_and_rollback_reach_every_worker_under_load_without_a_failed_request(tmp_path, settings):
    """Two workers under four clients; promote, then roll back: each worker switches within 5 s.

    With preloading and workers recycled every ~60 requests, the new workers fork from a
    master that still holds the start-up model: they must serve the current one.
    """
    import re
    import threading
    import time

    from harness.images import make_dataset
    from model.store import ModelStore

    store_dir = tmp_path / "store"
    data = make_dataset(tmp_path / "chest_xray", per_class=8)
    assert train.main(train.get_args_parser().parse_args(
        ["--data", str(data), "--store", str(store_dir), "--epochs", "1", "--dry-run", "--workers", "1",
         "--cache-dir", str(tmp_path / "cache")])) == 0
    store = ModelStore(store_dir)
    bundled, candidate = store.serving_version(), store.versions()[-1]["version"]
    xray = encode(synthetic_xray(500, 400), ".jpg")
    log_path = tmp_path / "server.log"
    env = {"PNEUMONIA_MODEL_STORE": str(store_dir), **settings}
    with gunicorn(workers=2, env=env, log_path=log_path) as (base, server):
        outcomes, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    status, body = post_image(base, xray, timeout=10)
                    outcomes.append((time.monotonic(), status, body.get("model_version")))
                except OSError as error:
                    outcomes.append((time.monotonic(), "connection", repr(error)))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        switches = {}  # per move: workers that kept the old model
        for version, action in ((candidate, "promote"), (bundled, "rollback")):
            time.sleep(1.5)
            before = {str(p.pid) for p in psutil.Process(server.pid).children()}
            with store.lock("promote"):
                store.set_serving(version, action, forced=True, reason="load drill")
            moved = time.monotonic()
            time.sleep(5)
            pattern = rf"\[(\d+)\] INFO app: now serving model {re.escape(version)}"
            alive = {str(p.pid) for p in psutil.Process(server.pid).children()}
            switched = set(re.findall(pattern, log_path.read_text()))
            # every worker that held the old model switched, unless it was recycled meanwhile
            switches[version] = (before & alive) - switched
            assert before and switches[version] == set(), f"workers that did not switch after the {action}"
            late = [o for o in outcomes if o[0] > moved + 5 and o[1] == 200 and o[2] != version]
            assert late == [], f"answers from the old model more than 5 s after the {action}"
        time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join()
    failed = [o for o in outcomes if o[1] != 200]
    assert failed == [] and len(outcomes) > 50
    assert {o[2] for o in outcomes} == {bundled, candidate}
