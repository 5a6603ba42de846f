"""Serving cost on this machine, for one original-size test JPEG.

    python -m bench.serve [--seconds 20] [--clients 8] [--workers 2]

Prints, all measured in this one run:
- in-process time to decode, preprocess and run the model (median of 50), with the
  single torch thread a gunicorn worker uses;
- gunicorn start-up time (process start to a ready /healthz);
- HTTP latency p50/p95/p99 over loopback, one client at a time (the ratio to the
  in-process time is the HTTP overhead), and with --clients concurrent clients
  (throughput, and latency under load);
- resident memory of each worker after the load.
Goals: sequential p50 <= 1.3x in-process, >= 30 requests/s, start <= 5 s, <= 600 MB per worker.
"""
from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import threading
import time

from model.settings import DEFAULT_CHECKPOINT, data_dir
from tests.support.server import gunicorn, multipart


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def in_process_ms(data: bytes, repeats: int = 50) -> float:
    import torch

    from model import Predictor

    torch.set_num_threads(1)
    predictor = Predictor.from_path(DEFAULT_CHECKPOINT)
    predictor.predict(data)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict(data)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def client_loop(port: int, body: bytes, content_type: str, stop_at: float, latencies: list, errors: list,
                max_requests: int | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sent = 0
    while time.perf_counter() < stop_at and (max_requests is None or sent < max_requests):
        started = time.perf_counter()
        try:
            connection.request("POST", "/api/v1/predict", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors.append(response.status)
            else:
                latencies.append((time.perf_counter() - started) * 1000)
        except OSError as exc:
            errors.append(type(exc).__name__)
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        sent += 1
    connection.close()


def drive(port: int, body: bytes, content_type: str, clients: int, seconds: float):
    latencies, errors = [], []
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=client_loop, args=(port, body, content_type, stop_at, latencies, errors))
               for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def worker_rss_mb(process) -> list[float]:
    import psutil

    return [child.memory_info().rss / 1024**2 for child in psutil.Process(process.pid).children()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = data_dir() / "test" / "PNEUMONIA"
    if not folder.is_dir():
        print(f"dataset not found at {data_dir()}: set CHEST_XRAY_DATA")
        return 2
    image = sorted(folder.iterdir())[0]
    data = image.read_bytes()
    from PIL import Image

    with Image.open(image) as im:
        size = im.size
    print(f"image: {image.name}, {size[0]}x{size[1]}, {len(data) / 1024:.0f} KB")
    inproc = in_process_ms(data)
    print(f"in-process decode+preprocess+model: {inproc:.1f} ms (median of 50, 1 torch thread)")

    body, content_type = multipart("image", "xray.jpeg", data, "image/jpeg")
    started = time.perf_counter()
    with gunicorn(workers=args.workers) as (base, process):
        start_s = time.perf_counter() - started
        port = int(base.rsplit(":", 1)[1])
        print(f"gunicorn start to ready /healthz: {start_s:.2f} s ({args.workers} workers)")
        drive(port, body, content_type, args.clients, 2)  # warm-up
        seq, seq_errors, _ = drive(port, body, content_type, 1, min(10, args.seconds))
        p50 = percentile(seq, 50)
        print(f"HTTP, 1 client:  p50 {p50:.1f} ms, p95 {percentile(seq, 95):.1f} ms, p99 {percentile(seq, 99):.1f} ms"
              f" over {len(seq)} requests; p50 / in-process = {p50 / inproc:.2f}x (goal <= 1.3x)")
        lat, errors, wall = drive(port, body, content_type, args.clients, args.seconds)
        if not lat:
            print(f"no successful request under load; errors: {sorted(set(map(str, errors)))[:5]}")
            return 1
        print(f"HTTP, {args.clients} clients: {len(lat) / wall:.1f} requests/s (goal >= 30); p50 {percentile(lat, 50):.1f} ms,"
              f" p95 {percentile(lat, 95):.1f} ms, p99 {percentile(lat, 99):.1f} ms; errors {len(errors) + len(seq_errors)}")
        rss = worker_rss_mb(process)
        print("resident memory per worker: " + ", ".join(f"{r:.0f} MB" for r in rss) + " (goal <= 600 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
