"""The deployed stack (deploy/serve.py, what `make serve` and the Docker image run): nginx
in front of gunicorn, against slow and idle clients, oversized bodies, the costliest
batch, and a SIGTERM in the middle of work. Real processes on loopback."""
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from harness.images import encode, largest_film, synthetic_xray
from harness.server import post_image, stack
from harness.slow_clients import attack, latencies

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")),
                                 reason="nginx is not installed (.ci/run and make serve install it)")]

XRAY = encode(synthetic_xray(400, 320), ".png")


def post(url: str, body: bytes, content_type: str, timeout: float = 60) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


def batch_body(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "b0undary7MA4YWxk"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                    "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files))
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_slow_and_idle_clients_cannot_starve_the_service():
    with stack(workers=2) as (base, _), attack(base, idle=1000, slow=50) as running:
        health = latencies(base + "/healthz", 50)
        predictions = [post_image(base, XRAY, timeout=5)[0] for _ in range(5)]
        time.sleep(max(0.0, 12 - (time.monotonic() - running.started)))  # past nginx's 10 s header timeout
        late = latencies(base + "/healthz", 10)
        assert running.refused == 0
        assert running.opened > 1050, "nginx closed no slow or idle client: their time is not bounded"
    assert np.percentile(health + late, 99) < 1.0, sorted(health + late)[-5:]
    assert predictions == [200] * 5


def test_a_body_past_the_limit_is_refused_by_the_proxy_and_never_written_to_disk(tmp_path):
    env = {"MAX_UPLOAD_MB": "2", "TMPDIR": str(tmp_path)}  # the launcher's runtime folder lands here
    with stack(workers=1, env=env) as (base, _):
        status, body, kind = post(base + "/api/v1/predict", b"\0" * (4 << 20), "image/png")
        assert status == 413 and kind == "application/json" and "limit is 2 MB" in json.loads(body)["error"]
        status, body, kind = post(base + "/predict", b"\0" * (4 << 20), "image/png")
        assert status == 413 and kind.startswith("text/html") and b"limit is 2 MB" in body
        film = encode(np.random.default_rng(0).integers(0, 256, (1100, 1000), np.uint8), ".png")  # ~1.1 MB
        status, _, _ = post(base + "/api/v1/predict", film, "image/png")
        assert status == 200
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".conf", ".pid", ".sock")]
        assert written == []


def test_the_costliest_batch_ends_within_its_budget_with_a_row_for_every_file():
    films = [largest_film(seed=i) for i in range(20)]  # 20 files of 40 megapixels, under 20 MB in all
    body, content_type = batch_body(films)
    with stack(workers=1) as (base, _):
        started = time.monotonic()
        status, answer, _ = post(base + "/api/v1/predict/batch", body, content_type)
        elapsed = time.monotonic() - started
    rows = json.loads(answer)["results"]
    assert status == 200 and len(rows) == 20 and elapsed < 20 + 15
    assert sum("in_distribution" in row for row in rows) == 3  # 120 megapixels a request
    assert all(row["status"] == 413 and "budget" in row["error"] for row in rows if "error" in row)


def test_sigterm_during_batches_loses_no_accepted_request():
    films = [largest_film(seed=i) for i in range(3)]  # what one request may decode, about a second's work
    body, content_type = batch_body(films)
    with stack(workers=1) as (base, server):
        answers = []

        def send():
            answers.append(post(base + "/api/v1/predict/batch", body, content_type))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # all three accepted, the first one being worked on
        server.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join()
        assert server.wait(timeout=60) == 0
        with pytest.raises(OSError):
            post_image(base, XRAY, timeout=2)  # stopped: nothing new is accepted
    assert [status for status, _, _ in answers] == [200] * 3
    assert all(len(json.loads(answer)["results"]) == 3 and b'"error"' not in answer for _, answer, _ in answers)


def test_the_launcher_and_the_app_share_the_request_budget_default():
    from app.config import request_budget_s
    from deploy.serve import SHUTDOWN_MARGIN_S, shutdown_seconds

    saved = os.environ.pop("REQUEST_BUDGET_S", None)
    try:
        assert shutdown_seconds() == request_budget_s() + SHUTDOWN_MARGIN_S
    finally:
        if saved is not None:
            os.environ["REQUEST_BUDGET_S"] = saved



