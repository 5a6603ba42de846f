"""Serve the app as deployed: nginx in front, gunicorn behind it on a private unix socket.

    python -m deploy.serve          # what `make serve` and the Docker image run

nginx takes every connection, waits for a whole request (headers and body, each within
a timeout) and only then hands it to gunicorn: slow or idle clients hold an nginx
connection, never one of gunicorn's threads. Settings come from the environment:
``HOST`` and ``PORT`` for the public address (0.0.0.0:8000), ``MAX_UPLOAD_MB`` and
``REQUEST_BUDGET_S`` as the app reads them, and gunicorn's own (gunicorn.conf.py).

With ``DICOM_PORT`` set, the DICOM node (``deploy/dicom.py``) runs beside them, in a
process of its own.

SIGTERM or SIGINT stops both gracefully: nginx first (it stops accepting and finishes
the requests it holds, which gunicorn is still there to answer), then gunicorn (and the
node, which finishes the film in hand; anything acknowledged waits in its spool).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
#: Multipart framing around the largest upload the app accepts (the app checks the exact limit).
MULTIPART_ALLOWANCE_MB = 1
#: What a request may take beyond the app's budget: one file's decoding and the answer.
SHUTDOWN_MARGIN_S = 15


def shutdown_seconds(environ=os.environ) -> int:
    """How long the longest request may take: the app's budget (its default as in app/config.py,
    not imported: this launcher stays free of torch) and the margin."""
    return int(float(environ.get("REQUEST_BUDGET_S", "20")) + SHUTDOWN_MARGIN_S)


def settings(environ=os.environ) -> dict:
    upload_mb = float(environ.get("MAX_UPLOAD_MB", "20"))
    longest = str(shutdown_seconds(environ))
    return {
        "LISTEN": f"{environ.get('HOST', '0.0.0.0')}:{environ.get('PORT', '8000')}",
        "MAX_UPLOAD_MB": f"{upload_mb:g}",
        "MAX_BODY": f"{int((upload_mb + MULTIPART_ALLOWANCE_MB) * 1024)}k",
        "UPSTREAM_S": longest,
        "SHUTDOWN_S": longest,
    }


def nginx_config(runtime: Path, values: dict) -> str:
    text = (DEPLOY / "nginx.conf").read_text()
    # nginx run by root starts its workers as "nobody", who could not reach the private socket.
    values = {**values, "RUNTIME": str(runtime), "DEPLOY": str(DEPLOY),
              "USER": "user root;" if os.geteuid() == 0 else ""}
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


def wait_for_socket(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise SystemExit(f"pneumonia-screening: gunicorn exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit("pneumonia-screening: gunicorn did not open its socket")
        time.sleep(0.1)


def main() -> int:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # not on a user's PATH
    if nginx is None:
        print("pneumonia-screening: nginx is not installed (Debian: apt-get install nginx-light)", file=sys.stderr)
        return 2
    runtime = Path(tempfile.mkdtemp(prefix="pneumonia-serve-"))
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    values = settings()
    (runtime / "nginx.conf").write_text(nginx_config(runtime, values))
    socket = runtime / "gunicorn.sock"
    app = subprocess.Popen([sys.executable, "-m", "gunicorn", "wsgi:app"], cwd=ROOT,
                           env={**os.environ, "BIND": f"unix:{socket}"})
    proxy = node = None
    if os.environ.get("DICOM_PORT"):
        node = subprocess.Popen([sys.executable, "-m", "deploy.dicom"], cwd=ROOT)
    try:
        wait_for_socket(socket, app)
        proxy = subprocess.Popen([nginx, "-e", "stderr", "-p", str(runtime), "-c", str(runtime / "nginx.conf")])
        print(f"pneumonia-screening: serving on http://{values['LISTEN']} (nginx in front of gunicorn)",
              file=sys.stderr, flush=True)
        while not stopping and app.poll() is None and proxy.poll() is None and (node is None or node.poll() is None):
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGQUIT)  # graceful: finish what it holds
            _wait(proxy, int(values["SHUTDOWN_S"]) + 5)
        for process in (app, node):
            if process is not None and process.poll() is None:
                process.terminate()  # graceful: gunicorn's graceful_timeout; the node's film in hand
                _wait(process, int(values["SHUTDOWN_S"]) + 5)
        shutil.rmtree(runtime, ignore_errors=True)


def _wait(process: subprocess.Popen, timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
    sys.exit(main())
