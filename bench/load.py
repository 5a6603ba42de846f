"""Load: gunicorn on loopback, 32 concurrent clients for 60 s, valid X-rays mixed with bad files.

    python -m bench.load [--clients 32] [--seconds 60] [--workers 2]

Prints requests served, answers by status, connection errors, p50/p99 latency, and
the workers' resident memory sampled every second (after warm-up vs. the end: flat
means no leak). Goal: 0 5xx, 0 connection errors.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import sys
import threading
import time
from collections import Counter

from harness.hostile import corpus
from harness.server import gunicorn, multipart
from model.settings import data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = data_dir() / "test"
    if not folder.is_dir():
        print(f"dataset not found at {data_dir()}: set CHEST_XRAY_DATA")
        return 2
    films = sorted((folder / "PNEUMONIA").iterdir())[:10] + sorted((folder / "NORMAL").iterdir())[:10]
    valid = [p.read_bytes() for p in films]
    bad = [case[2] for case in corpus() if case[3] == "refuse"]
    # two valid X-rays for every bad file
    mix = [multipart("image", "x.jpeg", data) for data in valid]
    mix += [multipart("image", "x.bin", data) for data in bad[:10]]
    import psutil

    with gunicorn(workers=args.workers) as (base, server):
        port = int(base.rsplit(":", 1)[1])
        statuses, errors, latencies = Counter(), Counter(), []
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client(offset: int):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for body, content_type in itertools.islice(itertools.cycle(mix), offset, None):
                if time.perf_counter() >= stop_at:
                    break
                started = time.perf_counter()
                try:
                    conn.request("POST", "/api/v1/predict", body=body, headers={"Content-Type": content_type})
                    response = conn.getresponse()
                    response.read()
                    with lock:
                        statuses[response.status] += 1
                        latencies.append((time.perf_counter() - started) * 1000)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        errors[type(exc).__name__] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.close()

        rss = []

        def sample():
            while time.perf_counter() < stop_at:
                workers = psutil.Process(server.pid).children()
                rss.append(sum(w.memory_info().rss for w in workers) / 1024**2 / max(len(workers), 1))
                time.sleep(1)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=sample))
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        peak = max(psutil.Process(server.pid).children(), key=lambda w: w.memory_info().rss).memory_info().rss
    latencies.sort()
    served = sum(statuses.values())
    five_xx = sum(n for s, n in statuses.items() if s >= 500)
    print(f"{args.clients} clients, {wall:.0f} s, {args.workers} workers: "
          f"{served} requests answered ({served / wall:.1f}/s)")
    print("by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())) + f"; 5xx: {five_xx}")
    print(f"connection errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"latency p50 {latencies[len(latencies) // 2]:.0f} ms, p99 {latencies[int(len(latencies) * 0.99)]:.0f} ms")
    warm = rss[min(5, len(rss) - 1)]
    print(f"worker RSS (mean per worker): {warm:.0f} MB after 5 s, {rss[-1]:.0f} MB at the end, "
          f"largest worker at the end {peak / 1024**2:.0f} MB")
    return 0 if five_xx == 0 and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
