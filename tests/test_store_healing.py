"""A store that heals: checksums, a pointer that cannot be read or names a broken version,
a read-only store; the command that repairs it, and servers that say what they serve."""
import dataclasses
import errno
import json
import re
import subprocess
import sys
import threading
import time

import pytest

from harness.images import encode, synthetic_xray
from harness.server import gunicorn, post_image
from model import load_checkpoint
from model.settings import DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, REPO_ROOT
from model.store import ModelStore
from training import store as store_command

XRAY = encode(synthetic_xray(400, 320), ".png")
BUNDLED = load_checkpoint(DEFAULT_CHECKPOINT).version
COPY = "stn-cnn-copy-of-bundled"
HEALTHY = {"status": "ok", "model_loaded": True, "model_version": COPY, "record": "ok",
           "model_runtime": "pytorch"}  # a version added without its ONNX file runs on PyTorch


def run_models(store, *argv) -> int:
    return store_command.main(store_command.get_args_parser().parse_args(["--store", str(store), *argv]))


@pytest.fixture
def store(tmp_path) -> ModelStore:
    """The bundled model serving, then a copy of it under another version (a real candidate,
    not a dry run) promoted over it: the history holds both."""
    store = ModelStore(tmp_path / "store")
    store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT)
    bundled = load_checkpoint(DEFAULT_CHECKPOINT)
    store.add(dataclasses.replace(bundled, version=COPY))
    with store.lock("promote"):
        store.set_serving(COPY, "promote", forced=True, reason="a drill")
    return store


def listing(store, capsys) -> dict:
    capsys.readouterr()
    assert run_models(store.root, "list", "--json") == 0
    return {row["version"]: row for row in json.loads(capsys.readouterr().out)}


def test_each_version_has_its_checksum_and_a_damaged_file_is_flagged_and_never_promoted(store, capsys, caplog):
    summary = json.loads((store.versions_dir / f"{COPY}.json").read_text())
    assert len(summary["sha256"]) == 64 and summary["bytes"] == store.checkpoint_path(COPY).stat().st_size
    assert listing(store, capsys)[COPY]["damage"] is None
    path = store.checkpoint_path(BUNDLED)
    path.write_bytes(path.read_bytes()[:-1000])  # truncated
    rows = listing(store, capsys)
    assert "damaged" in rows[BUNDLED]["damage"] and rows[COPY]["damage"] is None
    capsys.readouterr()
    assert run_models(store.root, "list") == 0
    assert re.search(rf"{BUNDLED}.*damaged", capsys.readouterr().out)
    assert run_models(store.root, "promote", BUNDLED, "--force", "--reason", "x") == 2
    assert "damaged" in caplog.text and store.serving_version() == COPY


def test_a_garbage_pointer_is_listed_and_repaired_from_the_backup_in_one_step(store, capsys):
    store.pointer_path.write_text("{not json")
    capsys.readouterr()
    assert run_models(store.root, "list") == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "repair" in out and BUNDLED in out and COPY in out
    assert run_models(store.root, "promote", BUNDLED) == 2 and store.pointer_path.read_text() == "{not json"
    assert run_models(store.root, "repair") == 0
    pointer = store.read_pointer()
    assert pointer.serving == COPY
    assert [e["action"] for e in pointer.history] == ["seed", "promote", "repair"]
    assert "unreadable" in pointer.history[-1]["reason"]
    capsys.readouterr()
    assert run_models(store.root, "repair") == 0 and "nothing to repair" in capsys.readouterr().out


def test_a_pointer_naming_a_missing_version_is_repaired_to_the_last_one_that_loads(store):
    store.checkpoint_path(COPY).unlink()
    assert run_models(store.root, "repair") == 0
    assert store.serving_version() == BUNDLED and "not found" in store.read_pointer().history[-1]["reason"]


def test_repair_names_a_version_when_no_history_is_left(store, caplog):
    store.pointer_path.write_text("[]")
    store.backup_path.unlink()
    assert run_models(store.root, "repair") == 2 and "repair VERSION" in caplog.text
    assert run_models(store.root, "repair", "no-such-version") == 2
    assert run_models(store.root, "repair", BUNDLED) == 0 and store.serving_version() == BUNDLED


def test_a_read_only_store_lists_and_refuses_changes_in_one_line(store, capsys, caplog, monkeypatch):
    import model.store

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(store.pointer_path))

    monkeypatch.setattr(model.store, "atomic_write", read_only)
    assert listing(store, capsys)[COPY]["serving"]
    assert run_models(store.root, "rollback") == 2
    assert "Read-only file system" in caplog.text and "Traceback" not in caplog.text
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
    monkeypatch.setattr(model.store, "FileLock", read_only)  # cannot even make its lock file
    caplog.clear()
    assert run_models(store.root, "rollback") == 2 and "cannot lock" in caplog.text
    assert store.serving_version() == COPY


# ---- servers ------------------------------------------------------------------------


def test_an_app_whose_pointer_breaks_keeps_answering_says_degraded_and_heals(make_app, store):
    app = make_app(MODEL_STORE=str(store.root))
    served, client = app.extensions["model"], app.test_client()
    assert client.get("/healthz").get_json()["status"] == "ok"
    store.pointer_path.write_text("garbage")
    served.refresh()
    health = client.get("/healthz")
    assert health.status_code == 200 and health.get_json()["status"] == "degraded"
    assert COPY in health.get_json()["problem"] and "repair" in health.get_json()["problem"]
    assert str(store.root) not in health.get_data(as_text=True)
    response = client.post("/api/v1/predict", data=XRAY, content_type="image/png")
    assert response.status_code == 200 and response.get_json()["model_version"] == COPY
    served.refresh()  # still broken: asked again, still degraded
    assert client.get("/healthz").get_json()["status"] == "degraded"
    assert run_models(store.root, "repair") == 0
    served.refresh()
    assert client.get("/healthz").get_json() == HEALTHY


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_an_app_whose_pointer_names_a_broken_version_keeps_its_model_and_says_so(make_app, store, damage):
    app = make_app(MODEL_STORE=str(store.root))
    served, client = app.extensions["model"], app.test_client()
    path = store.checkpoint_path(BUNDLED)
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pointer = json.loads(store.pointer_path.read_text())
    store.pointer_path.write_text(json.dumps({**pointer, "serving": BUNDLED}))  # a hand edit
    served.refresh()
    body = client.get("/healthz").get_json()
    assert body["status"] == "degraded" and body["model_version"] == COPY and "cannot be loaded" in body["problem"]
    assert client.post("/api/v1/predict", data=XRAY, content_type="image/png").status_code == 200
    assert run_models(store.root, "repair") == 0 and store.serving_version() == COPY
    served.refresh()
    assert client.get("/healthz").get_json()["status"] == "ok"


def test_a_read_only_store_serves(make_app, store, monkeypatch):
    import model.store

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(model.store, "FileLock", read_only)
    monkeypatch.setattr(model.store, "atomic_write", read_only)
    client = make_app(MODEL_STORE=str(store.root)).test_client()
    assert client.get("/healthz").get_json() == HEALTHY


def test_an_app_started_on_a_broken_pointer_serves_the_bundled_model_and_says_so(make_app, store):
    store.pointer_path.write_text("garbage")
    app = make_app(MODEL_STORE=str(store.root))
    body = app.test_client().get("/healthz").get_json()
    assert body["status"] == "degraded" and body["model_version"] == BUNDLED
    assert run_models(store.root, "repair") == 0
    app.extensions["model"].refresh()
    assert app.test_client().get("/healthz").get_json() == HEALTHY


@pytest.mark.slow
def test_workers_forked_after_the_pointer_broke_say_so_and_no_request_fails(store, tmp_path):
    """Two preloaded workers recycled every ~40 requests under two clients: the master holds
    the start-up model, so each new worker must say it cannot serve the pointer's."""
    env = {"PNEUMONIA_MODEL_STORE": str(store.root), "GUNICORN_MAX_REQUESTS": "40"}
    with gunicorn(workers=2, env=env, log_path=tmp_path / "server.log") as (base, _):
        outcomes, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    outcomes.append(post_image(base, XRAY, timeout=10)[0])
                except OSError as error:
                    outcomes.append(repr(error))

        threads = [threading.Thread(target=client) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(1)
        store.pointer_path.write_text("garbage")
        time.sleep(6)  # every worker has asked; several were recycled from the master
        health = [json.loads(urlopen(base + "/healthz")) for _ in range(20)]
        assert {(h["status"], h["model_version"]) for h in health} <= {("degraded", COPY), ("degraded", BUNDLED)}
        repair = subprocess.run([sys.executable, "-m", "training.store", "--store", str(store.root), "repair"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert repair.returncode == 0, repair.stderr
        time.sleep(4)
        health = [json.loads(urlopen(base + "/healthz")) for _ in range(20)]
        stop.set()
        for thread in threads:
            thread.join()
    assert {(h["status"], h["model_version"]) for h in health} == {("ok", COPY)}
    assert outcomes and set(outcomes) == {200}


def urlopen(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()
