"""Faults: a killed worker, a training run killed while saving, and nothing left on disk."""
import contextlib
import http.client
import io
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from harness.images import encode, synthetic_xray
from harness.server import gunicorn, post_image
from model import load_checkpoint
from model.settings import REPO_ROOT

XRAY = encode(synthetic_xray(500, 400), ".jpg")


@pytest.mark.slow
def test_a_worker_killed_mid_request_is_replaced_and_serving_continues():
    with gunicorn(workers=2) as (base, server):
        stop = threading.Event()
        outcomes = []

        def hammer():
            while not stop.is_set():
                try:
                    outcomes.append(post_image(base, XRAY, timeout=10)[0])
                except (OSError, http.client.HTTPException):  # the killed worker's own requests
                    outcomes.append("connection")

        clients = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        workers = psutil.Process(server.pid).children()
        assert len(workers) == 2
        victim = workers[0].pid
        os.kill(victim, signal.SIGKILL)  # requests are in flight on both workers
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = {p.pid for p in psutil.Process(server.pid).children()}
            if len(pids) == 2 and victim not in pids:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the killed worker was not replaced")
        served_before = outcomes.count(200)
        time.sleep(1.0)
        stop.set()
        for thread in clients:
            thread.join()
        assert outcomes.count(200) > served_before  # the replacement pool keeps answering
        for _ in range(5):
            assert post_image(base, XRAY)[0] == 200
        assert not [o for o in outcomes if isinstance(o, int) and o >= 500 and o != 502]


SAVE_AND_HANG = textwrap.dedent(
    """
    import os, sys, time
    import model.checkpoint as ck
    from model import load_checkpoint
    checkpoint = load_checkpoint(sys.argv[1])
    checkpoint.threshold = 0.123
    real_fsync = os.fsync
    def slow_fsync(fd):
        print("writing", flush=True)  # the temp file is half-way: written, not yet renamed
        time.sleep(60)
    ck.os.fsync = slow_fsync
    ck.save_checkpoint(checkpoint, sys.argv[1])
    """
)


def test_training_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes((REPO_ROOT / "model" / "weights" / "pneumonia_stn.pt").read_bytes())
    before = path.read_bytes()
    process = subprocess.Popen([sys.executable, "-c", SAVE_AND_HANG, str(path)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert path.read_bytes() == before
    assert load_checkpoint(path).threshold != 0.123


def snapshot(*roots: Path) -> dict[str, int]:
    files = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "__pycache__", ".pytest_cache")]
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    files[full] = os.stat(full).st_mtime_ns
                except FileNotFoundError:
                    pass
    return files


#: ``os.open`` flags that create or change a file (``O_TMPFILE`` makes an unnamed one, which no
#: folder listing shows: what ``tempfile.TemporaryFile`` uses on Linux).
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC | getattr(os, "O_TMPFILE", 0)
_opened_for_writing: list[str] | None = None  # a list while a test watches, None otherwise


def _record_writes(event: str, args: tuple) -> None:
    if _opened_for_writing is None or event != "open":
        return
    path, mode, flags = args
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
    if writes and path is not None:
        _opened_for_writing.append(os.fsdecode(path) if not isinstance(path, int) else f"fd {path}")


sys.addaudithook(_record_writes)  # audit hooks cannot be removed; this one is idle unless a test watches


@contextlib.contextmanager
def files_opened_for_writing():
    """The paths this process opens for writing inside the block (every ``open`` and ``os.open``):
    the app's own writes, whatever other programs on the machine do meanwhile."""
    global _opened_for_writing
    _opened_for_writing = opened = []
    try:
        yield opened
    finally:
        _opened_for_writing = None


def test_uploads_leave_nothing_on_disk(caplog, tmp_path, monkeypatch):
    """The app gets a temp folder of its own, and the test watches only what the app could write:
    that folder, the repository, the instance folder and every file the process opens for writing."""
    from app import create_app

    app_tmp = tmp_path / "app-tmp"
    app_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(app_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(app_tmp))
    app = create_app({"TESTING": True, "SECRET_KEY": "privacy"})
    client = app.test_client()
    big = encode(synthetic_xray(1500, 1400), ".png")  # over werkzeug's 500 KB spooling threshold
    roots = [REPO_ROOT, app_tmp, Path(app.instance_path)]
    before = snapshot(*roots)
    # Bodies encoded here, in memory: werkzeug's test client would spool a large one to a temp file itself.
    forms = [encode_multipart({"image": FileStorage(io.BytesIO(data), name)})
             for data, name in ((XRAY, "patient-1.jpg"), (big, "patient-2.png"), (b"junk", "patient-3.png"))]
    with files_opened_for_writing() as opened:
        for boundary, body in forms:
            response = client.post("/api/v1/predict", data=body,
                                   content_type=f"multipart/form-data; boundary={boundary}")
            assert response.status_code in (200, 415)
        client.post("/api/v1/predict", data=big, content_type="image/png")  # a raw-body upload, over 500 KB
    after = snapshot(*roots)
    assert opened == []
    assert {path for path, mtime in after.items() if before.get(path) != mtime} == set()
    assert "patient-" not in caplog.text
