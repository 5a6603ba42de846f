"""Start and stop the server on a free loopback port, for tests and benches: gunicorn alone,
or the deployed stack (``deploy/serve.py``: nginx in front of gunicorn)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

from model.settings import REPO_ROOT as ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PortTaken(RuntimeError):
    """Another program bound the free port between our check and gunicorn's bind."""


GUNICORN = [sys.executable, "-m", "gunicorn", "wsgi:app"]
STACK = [sys.executable, "-m", "deploy.serve"]


def gunicorn(workers: int = 1, env: dict | None = None, timeout: float = 90, log_path: Path | None = None):
    """gunicorn alone, clients talking to it directly; see ``server``."""
    return server(GUNICORN, workers, env, timeout, log_path)


def stack(workers: int = 1, env: dict | None = None, timeout: float = 90, log_path: Path | None = None):
    """What ``make serve`` runs: nginx in front of gunicorn; see ``server``."""
    return server(STACK, workers, env, timeout, log_path)


@contextmanager
def server(command: list[str], workers: int = 1, env: dict | None = None, timeout: float = 90,
           log_path: Path | None = None):
    """Yields (base_url, process); stops the server (and its workers) on exit.

    ``log_path``: keep the server's log in that file (for a test that reads it). A port that
    a neighbouring program takes before the server binds it is no failure: another is tried.
    """
    for attempt in range(3):
        try:
            started = _started(command, workers, env, timeout, log_path)
            break
        except PortTaken:
            if attempt == 2:
                raise
    base, process, log = started
    try:
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(process)  # the launcher, and nginx and gunicorn under it
        log.close()


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _started(command: list[str], workers: int, env: dict | None, timeout: float, log_path: Path | None):
    """(base_url, process, log) of a server that answers ``/healthz``."""
    port = free_port()
    environment = {**os.environ, "BIND": f"127.0.0.1:{port}", "HOST": "127.0.0.1", "PORT": str(port),
                   "WEB_CONCURRENCY": str(workers), **(env or {})}
    # The server's log goes to a file: an unread pipe fills up and blocks the workers.
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a group of its own: killed whole if it must be
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                text = log.read()
                if "Connection in use" in text or "Address already in use" in text or "in use)" in text:
                    raise PortTaken(text)
                raise RuntimeError(f"the server exited with {process.returncode}:\n{text}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2):
                    return base, process, log
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not become ready") from None
                time.sleep(0.2)
    except BaseException:
        _kill_group(process)
        log.close()
        raise


def multipart(field: str, filename: str, data: bytes, content_type="application/octet-stream") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post_image(base: str, data: bytes, timeout: float = 30) -> tuple[int, dict]:
    body, content_type = multipart("image", "x.png", data)
    request = urllib.request.Request(base + "/api/v1/predict", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
