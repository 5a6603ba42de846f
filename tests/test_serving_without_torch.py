"""Serving without PyTorch: a version's ONNX file is all a server reads, and no serving process
(app, gunicorn worker, DICOM node) loads torch."""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from harness.dicom_files import dx_film
from harness.images import encode, synthetic_xray
from harness.server import ROOT, free_port, gunicorn, post_image
from model import CheckpointError, load_checkpoint
from model.serving_file import METADATA_KEY, ServingFile, graph_beside
from model.settings import DEFAULT_CHECKPOINT
from model.store import ModelStore
from training import onnx_export
from training import store as store_command

pytestmark = pytest.mark.slow

#: Run first in a child process: every import of what requirements.txt adds to
#: requirements-serve.txt fails there, as in the serving image.
NO_TORCH = """
import sys
class TrainingOnly:
    names = ("torch", "sklearn", "tqdm", "onnx", "onnxscript")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (this process stands for the serving image)")
sys.meta_path.insert(0, TrainingOnly())
"""


def torch_mapped(pid: int) -> bool:
    """Whether a process has PyTorch's library in its memory: it imported torch."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture(scope="module")
def bundled():
    return load_checkpoint(DEFAULT_CHECKPOINT)


def test_the_bundled_serving_file_is_the_bundled_checkpoint_less_its_weights(bundled):
    served = ServingFile(graph_beside(DEFAULT_CHECKPOINT)).checkpoint
    assert served.version == bundled.version and served.state_dicts == []
    assert (served.threshold, served.calibration, served.preprocess) == (bundled.threshold, bundled.calibration,
                                                                          bundled.preprocess)
    assert json.dumps(served.metrics, sort_keys=True) == json.dumps(bundled.metrics, sort_keys=True)  # NaN too
    assert served.training_data == bundled.training_data and served.intended_use == bundled.intended_use
    assert np.array_equal(served.gate.precision, bundled.gate.precision)
    assert np.array_equal(served.population_gate.weight, bundled.population_gate.weight)
    assert served.population_gate.threshold == bundled.population_gate.threshold


def test_a_serving_file_that_is_not_its_checkpoint_s_is_refused_at_load(tmp_path):
    proto = onnx.load(str(graph_beside(DEFAULT_CHECKPOINT)))
    entry = next(e for e in proto.metadata_props if e.key == METADATA_KEY)
    raw = json.loads(entry.value)
    other_answers = np.full(32, 3.0)  # not this graph's logits
    raw["check"]["logits"] = {"__array__": {"dtype": other_answers.dtype.str, "shape": [32],
                                            "data": base64.b64encode(other_answers.tobytes()).decode()}}
    entry.value = json.dumps(raw)
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match="does not give its checkpoint's answers"):
        ServingFile(changed)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(graph_beside(DEFAULT_CHECKPOINT).read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ServingFile(truncated)


def test_training_adds_the_serving_file_and_list_says_where_the_export_refused(tmp_path, bundled, capsys):
    from model.population_nets import PopulationGate, PopulationNet

    store = ModelStore(tmp_path / "store")
    added = dataclasses.replace(bundled, version="stn-cnn-with-graph")
    onnx_export.add_to_store(store, added)
    assert store.graph_problem(added.version) is None
    assert store.load_serving(added.version).runtime == "onnxruntime"
    networks = PopulationGate((8, 8, 8, 8), [PopulationNet((8, 8, 8, 8)).eval().state_dict()], threshold=0.5)
    old_kind = dataclasses.replace(bundled, version="stn-cnn-old-gate", population_gate=networks)
    onnx_export.add_to_store(store, old_kind)
    assert "ONNX export was refused" in store.graph_problem(old_kind.version)
    assert not store.graph_path(old_kind.version).exists()
    assert store_command.main(store_command.get_args_parser().parse_args(["--store", str(store.root), "list"])) == 0
    listed = capsys.readouterr().out
    row = next(line for line in listed.splitlines() if old_kind.version in line)
    assert "serves only on PyTorch: its ONNX export was refused: its population gate is networks" in row
    assert "serves only on PyTorch" not in next(line for line in listed.splitlines() if added.version in line)


def test_the_app_serves_where_only_the_serving_requirements_are_installed(tmp_path, real_data):
    film = sorted((real_data / "test" / "PNEUMONIA").iterdir())[0]
    script = NO_TORCH + f"""
import json
from app import create_app
from tests.client import Uploads
app = create_app({{"MODEL_STORE": {str(tmp_path / 'store')!r}, "DATABASE_URL": "sqlite:///{tmp_path}/cases.db",
                  "SECRET_KEY": "test"}})
client = app.test_client()
health = client.get("/healthz").get_json()
answer = client.post("/api/v1/predict", data=open({str(film)!r}, "rb").read(), content_type="image/jpeg").get_json()
page = Uploads(client).form(open({str(film)!r}, "rb").read(), "film.jpeg")
pages = [client.get(path).status_code for path in ("/analysis", "/monitor", "/model", "/cases")]
print(json.dumps({{"health": health, "answer": answer, "page": page.status_code, "pages": pages,
                  "torch": "torch" in sys.modules}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["health"]["status"] == "ok" and out["health"]["model_runtime"] == "onnxruntime"
    assert out["answer"]["label"] == "PNEUMONIA" and out["page"] == 200 and out["torch"] is False
    assert out["pages"] == [200, 200, 200, 200]


def test_gunicorn_workers_never_load_torch(tmp_path):
    xray = encode(synthetic_xray(500, 400), ".jpg")
    with gunicorn(workers=2, env={"HOME": str(tmp_path)}) as (base, server):
        for _ in range(4):
            status, _ = post_image(base, xray)
            assert status == 200
        deadline = time.monotonic() + 30  # a loaded machine may still be forking the second worker
        while len(psutil.Process(server.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert len(processes) >= 3  # the master and its two workers
        assert [p.pid for p in processes if torch_mapped(p.pid)] == []


def test_the_dicom_node_never_loads_torch(tmp_path, pneumonia_pixels):
    port = free_port()
    env = {**os.environ, "DICOM_PORT": str(port), "DICOM_AET": "NODE", "DICOM_HOST": "127.0.0.1",
           "DICOM_PEERS": "SENDER@127.0.0.1", "DICOM_SPOOL": str(tmp_path / "spool"),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'cases.db'}", "PNEUMONIA_MODEL_STORE": str(tmp_path / "store")}
    node = subprocess.Popen([sys.executable, "-m", "deploy.dicom"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "node.log", "w"))
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(Verification)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        deadline = time.monotonic() + 60
        while True:
            assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
            if assoc.is_established:
                break
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.3)
        status = assoc.send_c_store(dx_film(pneumonia_pixels))
        assoc.release()
        assert status.Status == 0
        assert not torch_mapped(node.pid)
    finally:
        node.terminate()
        node.wait(timeout=30)


def test_loading_a_version_writes_nothing_and_sends_nothing(tmp_path):
    """onnxruntime's Linux wheels carry telemetry that writes a session file to TMPDIR on load;
    ours is off before the library loads."""
    script = ("import numpy as np; from model.serving_file import ServingFile; from model.settings import "
              "DEFAULT_CHECKPOINT; from model.serving_file import graph_beside; "
              "ServingFile(graph_beside(DEFAULT_CHECKPOINT)).predictor().predict_many(np.zeros((1, 64, 64), 'f4'))")
    environment = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**environment, "TMPDIR": str(tmp_path)},
                   check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []


def test_numbers_and_arrays_keep_their_kind_through_the_serving_file():
    from model.serving_file import _decode, _encode

    decoded = _decode(json.loads(json.dumps(_encode(
        {"auc": np.float64(0.98), "count": np.int64(3), "grid": np.arange(6, dtype=np.float32).reshape(2, 3)}))))
    assert decoded["auc"] == 0.98 and isinstance(decoded["auc"], float) and isinstance(decoded["count"], int)
    assert decoded["grid"].dtype == np.float32 and decoded["grid"].tolist() == [[0, 1, 2], [3, 4, 5]]
