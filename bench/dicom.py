"""The DICOM node end to end through Debian's Orthanc (issue 45's goals).

    python -m bench.dicom [--singles 20] [--burst 200] [--down-s 60]

The node runs as it is deployed (``python -m deploy.dicom``, its own process, a SQLite
record); Orthanc routes to it and receives its reports. Films are the test split's,
made DX DICOM files (20 studies). Prints:
- a film stored in Orthanc and sent to the node: seconds until its report is in the same
  study in Orthanc (p50, p95), and whether every decision equals the in-process answer for
  the same file (goal: p50 <= 2 s, all equal);
- a burst of ``--burst`` films from 20 studies in one Orthanc job: reports in Orthanc,
  distinct films answered, films answered twice (goal: all, none twice) and the node's
  resident memory above idle (goal: <= 300 MB);
- Orthanc stopped ``--down-s`` seconds while 20 films reach the node from a sender with
  its AE title: seconds from Orthanc's return until the last report is in (goal: <= 30 s);
- the node killed (SIGKILL) in the middle of a burst and started again: films the PACS
  was told were stored, and of those, answered (goal: all).
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import psutil
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from harness import orthanc as orthanc_harness
from harness.dicom_files import dx_film
from model import Predictor
from model.settings import DEFAULT_CHECKPOINT, data_dir

NODE_AET = "PNEUMONIA"
FINDING = {"52101004": "PNEUMONIA", "2667000": "NORMAL"}


def films(count: int, studies: int = 20) -> list[bytes]:
    paths = sorted((data_dir() / "test" / "PNEUMONIA").iterdir()) + sorted((data_dir() / "test" / "NORMAL").iterdir())
    study_uids = [generate_uid() for _ in range(studies)]
    made = []
    for i, path in enumerate(paths[:count]):
        pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        buffer = io.BytesIO()
        dx_film(pixels, tags={"PatientAge": "004Y"}, study_uid=study_uids[i % studies]).save_as(
            buffer, enforce_file_format=True)
        made.append(buffer.getvalue())
    return made


class NodeProcess:
    def __init__(self, folder: Path, port: int, pacs_port: int):
        self.env = {**os.environ, "DICOM_PORT": str(port), "DICOM_AET": NODE_AET, "DICOM_HOST": "127.0.0.1",
                    "DICOM_PEERS": f"{orthanc_harness.AET}@127.0.0.1",
                    "DICOM_DESTINATION": f"{orthanc_harness.AET}@127.0.0.1:{pacs_port}",
                    "DICOM_SPOOL": str(folder / "spool"), "DATABASE_URL": f"sqlite:///{folder / 'cases.sqlite3'}",
                    "PNEUMONIA_MODEL_STORE": str(folder / "models")}
        self.port = port
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "deploy.dicom"], env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=open(self.folder / "node.log", "ab"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ae = AE(ae_title=orthanc_harness.AET)
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
            if assoc.is_established:
                assoc.release()
                return
            time.sleep(0.3)
        raise RuntimeError("the node did not start")

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def reports_by_film(pacs) -> dict[str, list[str]]:
    """Source film SOP Instance UID -> the finding codes of the reports about it, over every study in Orthanc."""
    found: dict[str, list[str]] = {}
    for study in pacs.get("/studies"):
        for instance in pacs.reports(study):
            report = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance)))
            source = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            film = source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            found.setdefault(film, []).append(finding(report))
    return found


def finding(report) -> str:
    def walk(items):
        for item in items:
            if item.ConceptNameCodeSequence[0].CodeValue == "233604007":
                return FINDING[item.ConceptCodeSequence[0].CodeValue]
            deeper = walk(item.get("ContentSequence", []))
            if deeper:
                return deeper
        return None

    return walk(report.ContentSequence) or "refused"


def count_reports(pacs) -> int:
    return sum(len(pacs.reports(study)) for study in pacs.get("/studies"))


def wait_for_reports(pacs, count: int, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if count_reports(pacs) >= count:
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def send_direct(port: int, datasets: list[bytes], counted: dict | None = None) -> int:
    """C-STORE from a sender with Orthanc's AE title (as Orthanc would); the films acknowledged,
    counted as they are (``counted["acknowledged"]``) so that a node killed midway leaves the count."""
    counted = {"acknowledged": 0} if counted is None else counted
    ae = AE(ae_title=orthanc_harness.AET)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    for data in datasets:
        if not assoc.is_established:
            break
        status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(data)))
        if status and status.Status == 0:
            counted["acknowledged"] += 1
    if assoc.is_established:
        assoc.release()
    return counted["acknowledged"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--down-s", type=float, default=60)
    args = parser.parse_args()
    if orthanc_harness.binary() is None:
        print("Orthanc is not installed (Debian package orthanc)")
        return 2
    predictor = Predictor.from_path(DEFAULT_CHECKPOINT)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "orthanc").mkdir()
        node_port = orthanc_harness.free_port()
        pacs = orthanc_harness.Orthanc(root / "orthanc", (NODE_AET, node_port))
        pacs.start()
        node = NodeProcess(root, node_port, pacs.dicom_port)
        node.start()
        try:
            # 1. one film at a time
            singles = films(args.singles)
            seconds, equal = [], 0
            for data in singles:
                stored = pacs.upload(data)
                started = time.monotonic()
                pacs.send_to_node([stored["ID"]])
                while not pacs.reports(stored["ParentStudy"]):
                    time.sleep(0.02)
                seconds.append(time.monotonic() - started)
                wanted = predictor.predict(data)
                equal += reports_by_film_one(pacs, stored) == (wanted.label or "refused")
            print(f"single films: report in Orthanc p50 {statistics.median(seconds):.2f} s, "
                  f"p95 {sorted(seconds)[int(0.95 * (len(seconds) - 1))]:.2f} s over {len(seconds)}; "
                  f"decisions equal to the in-process answer: {equal} of {len(seconds)}")

            # 2. a burst, with the node's memory
            idle = node.rss_mb()
            peak = [idle]
            watching = threading.Event()

            def watch():
                while not watching.is_set():
                    peak[0] = max(peak[0], node.rss_mb())
                    time.sleep(0.1)

            threading.Thread(target=watch, daemon=True).start()
            before = count_reports(pacs)
            ids = [pacs.upload(data)["ID"] for data in films(args.burst)]
            started = time.monotonic()
            pacs.send_to_node(ids, asynchronous=True)
            took = wait_for_reports(pacs, before + args.burst, timeout=600)
            watching.set()
            by_film = reports_by_film(pacs)
            print(f"burst of {args.burst}: {count_reports(pacs) - before} reports in "
                  f"{took if took is None else round(took, 1)} s; films answered {len(by_film)} "
                  f"(with the singles), twice {sum(len(v) > 1 for v in by_film.values())}; node memory idle "
                  f"{idle:.0f} MB, peak {peak[0]:.0f} MB (+{peak[0] - idle:.0f})")

            # 3. Orthanc down
            before = count_reports(pacs)
            pacs.stop()
            acknowledged = send_direct(node_port, films(20))
            time.sleep(args.down_s)
            pacs.start()
            back = wait_for_reports(pacs, before + acknowledged, timeout=300)
            print(f"Orthanc down {args.down_s:.0f} s: {acknowledged} films acknowledged meanwhile; the last report "
                  f"in {back if back is None else round(back, 1)} s after its return")

            # 4. the node killed mid-burst
            before = count_reports(pacs)
            burst = films(150)
            counted = {"acknowledged": 0}

            thread = threading.Thread(target=send_direct, args=(node_port, burst, counted))
            thread.start()
            time.sleep(2.0)  # some films acknowledged, the rest on their way
            node.kill()
            thread.join()
            node.start()
            done = wait_for_reports(pacs, before + counted["acknowledged"], timeout=300)
            print(f"node killed mid-burst: {counted['acknowledged']} of {len(burst)} films acknowledged before the "
                  f"kill, reports "
                  f"{count_reports(pacs) - before} after the restart "
                  f"({'all' if done is not None else 'NOT all'} answered)")
        finally:
            node.stop()
            pacs.stop()
    return 0


def reports_by_film_one(pacs, stored: dict) -> str:
    instance = pacs.reports(stored["ParentStudy"])[-1]
    return finding(pydicom.dcmread(io.BytesIO(pacs.instance_file(instance))))


if __name__ == "__main__":
    sys.exit(main())
