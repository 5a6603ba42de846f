"""Hardening figures (issue 30): what the costliest and the most hostile requests cost.

    python -m bench.hardening [--skip-slow-clients]

Prints, each measured on real processes on loopback:
- a 3 MB deflated DICOM bomb through gunicorn: status, seconds, the worker's RSS growth
  (goal: refused in < 1 s, < 300 MB);
- a prediction over HTTP through nginx and gunicorn against gunicorn alone (p50);
- a seeded DICOM mutation fuzz (5,000 files, in-process, the API's code path): answers
  by status (goal: no 500);
- the costliest batch (20 files of 40 MP, under 20 MB) through the deployed stack:
  status, seconds, files answered and refused (goal: within REQUEST_BUDGET_S + margin);
- 50 slow senders and 1,000 idle connections against the deployed stack and against
  gunicorn alone: /healthz p50/p99/max over 50 requests, predictions answered of 5
  (goal for the stack: p99 < 1 s, 5 of 5).
"""
from __future__ import annotations

import argparse
import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import psutil

from harness.dicom_files import deflate_bomb, mutations
from harness.images import encode, largest_film, synthetic_xray
from harness.server import gunicorn, multipart, post_image, stack
from harness.slow_clients import attack, latencies

XRAY = encode(synthetic_xray(400, 320), ".png")


def post(url: str, body: bytes, content_type: str, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def peak_rss_while(server: psutil.Process, work) -> tuple[object, float]:
    """``work()``'s result and the largest growth (MB) of any worker's RSS while it ran."""
    workers = server.children(recursive=True)
    before = {w.pid: w.memory_info().rss for w in workers}
    peak = dict(before)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for w in workers:
                try:
                    peak[w.pid] = max(peak[w.pid], w.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[pid] - before[pid] for pid in before) / 2**20


def deflate_bomb_figures() -> None:
    bomb = deflate_bomb(3)
    body, content_type = multipart("image", "bomb.dcm", bomb)
    with gunicorn(workers=1) as (base, server):
        started = time.perf_counter()
        (status, answer), growth = peak_rss_while(psutil.Process(server.pid),
                                                  lambda: post(base + "/api/v1/predict", body, content_type))
        seconds = time.perf_counter() - started
    print(f"deflate bomb ({len(bomb) / 2**20:.1f} MB, ~3 GB inflated): {status}, {seconds:.2f} s, "
          f"worker RSS +{growth:.0f} MB  ({json.loads(answer)['error'][:60]}...)")


def fuzz_figures(count: int = 5000) -> None:
    from app import create_app

    client = create_app({"TESTING": True, "SECRET_KEY": "bench"}).test_client()
    statuses, started = Counter(), time.perf_counter()
    files = list(mutations(count, seed=30))
    for start in range(0, count, 20):
        payload = {"images": [(io.BytesIO(d), "m.dcm") for d in files[start : start + 20]]}
        response = client.post("/api/v1/predict/batch", data=payload, content_type="multipart/form-data")
        statuses["request " + str(response.status_code)] += 1
        for row in response.get_json().get("results", []):
            statuses[row.get("status", 200)] += 1
    seconds = time.perf_counter() - started
    rows = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str))
    print(f"DICOM mutation fuzz, {count} files in {count // 20} batch requests, {seconds:.0f} s: {rows}")


def costliest_batch_figures() -> None:
    films = [largest_film(seed=i) for i in range(20)]
    boundary = "benchb0undary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                    "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(films))
    body += f"--{boundary}--\r\n".encode()
    lifted = {"MAX_REQUEST_MEGAPIXELS": "100000"}
    for label, env in (("default budgets", {}), ("pixel budget lifted", lifted),
                       ("pixel budget lifted, 1 s time budget", {**lifted, "REQUEST_BUDGET_S": "1"})):
        with stack(workers=1, env=env) as (base, _):
            started = time.perf_counter()
            status, answer = post(base + "/api/v1/predict/batch", body, f"multipart/form-data; boundary={boundary}")
            seconds = time.perf_counter() - started
        rows = json.loads(answer)["results"]
        answered = sum("probability" in row for row in rows)
        print(f"costliest batch (20 x 40 MP, {len(body) / 2**20:.1f} MB), {label}: {status}, {seconds:.1f} s, "
              f"{answered} answered, {len(rows) - answered} refused by a budget")


def slow_client_figures() -> None:
    for label, server in (("nginx + gunicorn (make serve)", stack), ("gunicorn alone", gunicorn)):
        with server(workers=2) as (base, _), attack(base, idle=1000, slow=50) as running:
            health = latencies(base + "/healthz", 50)
            answered = 0
            for _ in range(5):
                try:
                    answered += post_image(base, XRAY, timeout=5)[0] == 200
                except OSError:
                    pass
            refused = running.refused
        p50, p99 = np.percentile(health, 50), np.percentile(health, 99)
        print(f"50 slow + 1000 idle clients, {label}: /healthz p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {max(health) * 1000:.0f} ms (5 s = timed out); predictions {answered}/5; "
              f"attack connections refused {refused}")


def proxy_overhead_figures(rounds: int = 200) -> None:
    """The hop through nginx: p50 of raw-body predictions, the two servers in turn, round after round."""
    import http.client

    servers = {"gunicorn alone": gunicorn, "nginx + gunicorn": stack}
    times = {label: [] for label in servers}
    with gunicorn(workers=1) as (alone, _), stack(workers=1) as (proxied, _):
        bases = {"gunicorn alone": alone, "nginx + gunicorn": proxied}
        connections = {label: http.client.HTTPConnection(*base.removeprefix("http://").split(":"))
                       for label, base in bases.items()}
        for _ in range(rounds):
            for label, connection in connections.items():
                started = time.perf_counter()
                connection.request("POST", "/api/v1/predict", XRAY, {"Content-Type": "image/png"})
                connection.getresponse().read()
                times[label].append(time.perf_counter() - started)
    alone_p50, proxied_p50 = (np.percentile(times[label][20:], 50) * 1000 for label in servers)
    print(f"prediction over HTTP, keep-alive, p50 of {rounds}: gunicorn alone {alone_p50:.2f} ms, "
          f"nginx + gunicorn {proxied_p50:.2f} ms ({proxied_p50 / alone_p50:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-slow-clients", action="store_true")
    args = parser.parse_args()
    deflate_bomb_figures()
    proxy_overhead_figures()
    fuzz_figures()
    costliest_batch_figures()
    if not args.skip_slow_clients:
        slow_client_figures()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
