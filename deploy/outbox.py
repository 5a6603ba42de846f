"""The DICOM node's outbox: structured reports on their way to the PACS, none lost.

A report is written to the outbox folder (atomically, named by its SOP Instance UID) and
its delivery is a row in the case record before the film is acknowledged. One thread sends
what is due, at once when a report arrives. The same file, so the same UIDs, goes on every
try. A transient failure (the PACS down or busy, an association refused or cut, out of
resources) is tried again after a doubling wait capped at 15 s, so a PACS back from an
outage has every report within about that; a permanent refusal (the PACS says it cannot
understand or store this object) is kept apart as ``failed`` with the PACS's status and
shown on /monitor and the case, never retried by itself.
"""
from __future__ import annotations

import datetime as dt
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage

from app.cases import CaseRecord
from model.atomic import atomic_write

log = logging.getLogger("dicom")

#: Waits between tries: doubling from the first, never above the cap.
FIRST_WAIT_S, MAX_WAIT_S = 1.0, 15.0
#: The PACS's C-STORE statuses that mean "stored" (success and warnings: coercion, elements discarded).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        aet, _, address = text.partition("@")
        host, _, port = address.rpartition(":")
        if not (aet and host and port.isdigit()):
            raise ValueError(f"DICOM_DESTINATION must read AET@host:port, not {text[:60]!r}")
        return cls(aet, host, int(port))


def wait_after(attempts: int) -> float:
    return min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** max(attempts - 1, 0))


def transient(status: int) -> bool:
    """Out of resources (0xA7xx) is worth another try; any other failure status is the PACS's final word."""
    return 0xA700 <= status <= 0xA7FF


class Outbox:
    def __init__(self, record: CaseRecord, folder: Path, destination: Destination | None, calling_aet: str,
                 timeout_s: float = 10.0):
        self.record = record
        self.folder = folder
        self.destination = destination
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, sr_uid: str) -> Path:
        return self.folder / f"{sr_uid}.dcm"

    def put(self, case_id: str, report) -> str:
        """Keep ``report`` (a pydicom dataset) for ``case_id`` and queue it; its SOP Instance UID."""
        sr_uid = str(report.SOPInstanceUID)
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        with atomic_write(self.path(sr_uid)) as handle:
            handle.write(buffer.getvalue())
        self.record.add_delivery(case_id, sr_uid)
        self._wake.set()
        return sr_uid

    # ---- sending --------------------------------------------------------------------

    def deliver_due(self) -> int:
        """Send every report that is due now; how many were tried."""
        if self.destination is None:
            return 0
        due = self.record.due_deliveries()
        for delivery in due:
            try:
                self.deliver(delivery)
            except Exception as exc:  # noqa: BLE001 - one report's trouble must not hold the others back
                self._again(delivery, f"{type(exc).__name__} while sending")
        return len(due)

    def deliver(self, delivery) -> str:
        """One try; the delivery's state after it."""
        path = self.path(delivery.sr_uid)
        if not path.is_file():
            self.record.delivery_done(delivery.id, "failed", "the report's file is missing from the outbox")
            return "failed"
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(Comprehensive3DSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        destination = self.destination
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.aet)
        try:
            if not assoc.is_established:
                why = ("the PACS refused the association" if assoc.is_rejected else
                       "the PACS ended the association: does it accept Comprehensive 3D SR?" if assoc.is_aborted
                       else "the PACS could not be reached")
                return self._again(delivery, why)
            try:
                status = assoc.send_c_store(pydicom.dcmread(path))
            except ValueError:  # no accepted presentation context: this PACS takes no such report
                self.record.delivery_done(delivery.id, "failed", "the PACS does not accept Comprehensive 3D SR")
                return "failed"
            code = getattr(status, "Status", None)
        finally:
            if assoc.is_established:
                assoc.release()
        if code is None:
            return self._again(delivery, "no answer from the PACS (timed out or cut)")
        if code in STORED:
            self.record.delivery_done(delivery.id, "sent")
            path.unlink(missing_ok=True)
            return "sent"
        if transient(code):
            return self._again(delivery, f"the PACS is out of resources (0x{code:04X})")
        log.error("the PACS refused a structured report for good (status 0x%04X)", code)
        self.record.delivery_done(delivery.id, "failed", f"the PACS refused it (status 0x{code:04X})")
        return "failed"

    def _again(self, delivery, error: str) -> str:
        attempts = delivery.attempts + 1
        retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait_after(attempts))
        self.record.delivery_done(delivery.id, "pending", error, retry_at)
        if attempts == 1:
            log.warning("a structured report waits: %s", error)
        return "pending"

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception as exc:  # noqa: BLE001 - the record down: every report stays queued
                log.error("the outbox could not be read (%s); trying again", type(exc).__name__)
            self._wake.wait(0.5)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, daemon=True, name="dicom-outbox")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)
