"""A real PACS for the tests and the bench: Debian's Orthanc, started with a configuration of
its own (temporary folders, free ports, loopback only), driven through its REST API."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

AET = "ORTHANC"


def binary() -> str | None:
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path, node: tuple[str, int]):
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "test-pacs", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": AET, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpServerEnabled": True, "Plugins": [], "LuaScripts": [],
            "DicomModalities": {"node": [node[0], "127.0.0.1", node[1]]}, "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False, "StableAge": 60, "ConcurrentJobs": 2, "DicomScpTimeout": 30,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        self.process = subprocess.Popen([binary(), str(self.folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                                        stderr=open(self.folder / "orthanc.log", "ab"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError) as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "orthanc.log").read_text()[-800:]
                    raise RuntimeError(f"Orthanc did not start: {log}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    # ---- REST ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | dict | list | None = None):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if payload[:1] in (b"{", b"[") else payload

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, data: bytes) -> dict:
        return self.request("POST", "/instances", data)

    def send_to_node(self, instance_ids: list[str], asynchronous: bool = False):
        return self.request("POST", "/modalities/node/store",
                            {"Resources": instance_ids, "Synchronous": not asynchronous})

    def reports(self, study_id: str) -> list[str]:
        """The instance ids of the SR series of a study."""
        found = []
        for series in self.get(f"/studies/{study_id}/series"):
            if series["MainDicomTags"].get("Modality") == "SR":
                found += series["Instances"]
        return found

    def instance_file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")


@contextmanager
def orthanc(folder: Path, node: tuple[str, int]):
    """A running Orthanc that knows the node as modality ``node``."""
    pacs = Orthanc(folder, node)
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()
