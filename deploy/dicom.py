"""The DICOM node: films pushed from the PACS, answers sent back into their studies.

    python -m deploy.dicom          # alone; `make serve` and the Docker image start it when DICOM_PORT is set
    python -m deploy.dicom catch-up [--hours 24]    # films the PACS holds that were never answered

Settings (environment): ``DICOM_AET`` (our AE title, default PNEUMONIA), ``DICOM_PORT``,
``DICOM_PEERS`` (who may send: ``AET@host`` items, comma-separated; ``AET`` alone allows
that title from any host; anyone else is rejected at association), ``DICOM_DESTINATION``
(``AET@host:port``, where the structured reports go; unset: they wait in the outbox),
``DICOM_SPOOL`` (the node's folder, default ``instance/dicom``), and the app's
``DATABASE_URL`` and model store.

Only CR and DX For Presentation films are accepted, in the transfer syntaxes we decode;
any other SOP class is rejected at negotiation. Nothing is lost once acknowledged: the
film is written (atomically, under a name made from its SOP Instance UID, never one the
sender chose) before it is answered, its case and the report's delivery are in the record
before the node answers 0x0000, and the film is deleted once answered. A film the node was
killed on is answered when it starts again; the same SOP Instance UID sent again is
acknowledged and not answered twice. Reports leave through the outbox (``deploy/outbox.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from app.answering import answer
from app.cases import CaseRecord, StudyLink
from app.serving import ServedModel
from model import DecodeLimits, ImageError
from model.atomic import atomic_write
from model.settings import DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, REPO_ROOT, database_url, model_store_dir
from model.store import ModelStore

from .catchup import catch_up
from .outbox import Destination, Outbox
from .report import structured_report

log = logging.getLogger("dicom")

ACCEPTED = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation)
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                     JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEG2000Lossless, JPEG2000]
#: C-STORE statuses: stored; out of resources (the sender keeps the film and tries again);
#: cannot understand (a film we will never read: sending it again cannot help).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


class SettingError(ValueError):
    """A node setting it cannot run with; the message names it."""


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str | None  # None: any host

    @classmethod
    def parse(cls, text: str) -> Peer:
        aet, _, host = text.strip().partition("@")
        if not 0 < len(aet.strip()) <= 16:
            raise SettingError(f"DICOM_PEERS: {text.strip()[:40]!r} is not AET or AET@host (titles of 1-16 characters)")
        return cls(aet.strip(), host.strip() or None)


@dataclass(frozen=True)
class NodeSettings:
    aet: str = "PNEUMONIA"
    port: int = 11112
    peers: tuple[Peer, ...] = ()
    destination: Destination | None = None
    spool: Path = field(default_factory=lambda: REPO_ROOT / "instance" / "dicom")
    host: str = "0.0.0.0"

    @classmethod
    def from_environment(cls, env=os.environ) -> NodeSettings:
        peers = tuple(Peer.parse(item) for item in env.get("DICOM_PEERS", "").split(",") if item.strip())
        if not peers:
            raise SettingError("DICOM_PEERS is empty: name the PACS that may send films (AET@host, comma-separated)")
        try:
            port = int(env.get("DICOM_PORT", "11112"))
        except ValueError:
            raise SettingError(f"DICOM_PORT must be a port number, not {env.get('DICOM_PORT', '')[:20]!r}") from None
        destination = env.get("DICOM_DESTINATION", "").strip()
        return cls(aet=env.get("DICOM_AET", "PNEUMONIA").strip() or "PNEUMONIA", port=port, peers=peers,
                   destination=Destination.parse(destination) if destination else None,
                   spool=Path(env.get("DICOM_SPOOL") or REPO_ROOT / "instance" / "dicom"),
                   host=env.get("DICOM_HOST", "0.0.0.0"))

    def allows(self, aet: str, host: str) -> bool:
        return any(peer.aet == aet and peer.host in (None, host) for peer in self.peers)


class Node:
    """One node: the storage service, the films it holds until answered, and its outbox."""

    def __init__(self, settings: NodeSettings, served: ServedModel, record: CaseRecord):
        self.settings = settings
        self.served = served
        self.record = record
        self.incoming = settings.spool / "incoming"
        self.outbox = Outbox(record, settings.spool / "outbox", settings.destination, settings.aet)
        self.device_uid = generate_uid(entropy_srcs=["pneumonia-screening-node", settings.aet])
        self._lock = threading.Lock()  # one film answered at a time: the node is one process on two cores
        self._server = None
        for folder in (self.incoming, self.outbox.folder):
            folder.mkdir(parents=True, exist_ok=True)

    # ---- receiving ------------------------------------------------------------------

    def film_path(self, sop_uid: str) -> Path:
        return self.incoming / f"{hashlib.sha256(sop_uid.encode()).hexdigest()[:32]}.dcm"

    def on_requested(self, event) -> None:
        """Reject, at association, a calling AE title and host that ``DICOM_PEERS`` does not name."""
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title  # the request's: the requestor's own is set later
        calling = (calling.decode("ascii", "replace") if isinstance(calling, bytes) else str(calling)).strip()
        if not self.settings.allows(calling, requestor.address):
            log.warning("association from %s refused: not among DICOM_PEERS", requestor.address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE title not recognised
            event.assoc.is_rejected = True
            event.assoc.kill()

    def on_store(self, event) -> int:
        """Keep the film, answer it, and only then acknowledge it."""
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            sop_uid = str(dataset.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - a dataset pydicom cannot parse: the sender should not retry it
            log.warning("a film from %s could not be parsed", event.assoc.requestor.address)
            return CANNOT_UNDERSTAND
        try:
            known = self.record.case_of_instance(sop_uid)
            if known is not None and known[1]:
                return SUCCESS  # sent again: acknowledged, answered once
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            with atomic_write(self.film_path(sop_uid)) as handle:
                handle.write(buffer.getvalue())
            return self.answer_film(self.film_path(sop_uid))
        except Exception as exc:  # noqa: BLE001 - the disk or the record failed: the PACS keeps the film
            log.error("a film could not be kept (%s): the sender is told to try again", type(exc).__name__)
            return OUT_OF_RESOURCES

    # ---- answering ------------------------------------------------------------------

    def answer_film(self, path: Path) -> int:
        """Answer the film at ``path`` through the app's answering service, put its report in the
        outbox, then delete the film; the C-STORE status to give. ``OUT_OF_RESOURCES`` when the
        record could not take it (the film stays, the sender tries again); ``CANNOT_UNDERSTAND``
        for a film no decoder reads (deleted: sending it again cannot help)."""
        with self._lock:
            data = path.read_bytes()
            film = pydicom.dcmread(io.BytesIO(data), force=True)
            sop_uid = str(film.SOPInstanceUID)
            known = self.record.case_of_instance(sop_uid)
            if known is not None and known[1]:
                path.unlink(missing_ok=True)  # answered before a crash took the node: nothing to do again
                return SUCCESS
            predictor = self.served.current()
            try:
                if known is None:
                    study = StudyLink(str(film.StudyInstanceUID), str(film.SeriesInstanceUID), sop_uid)
                    answered = answer(predictor, self.record, data, "dicom", study=study)
                    if answered.case_id is None:
                        return OUT_OF_RESOURCES
                    prediction, case_id = answered.prediction, answered.case_id
                else:  # the case was recorded, its report not yet made: make it from the same film
                    prediction, case_id = predictor.predict(data), known[0]
            except ImageError as exc:
                log.warning("a film could not be read (%s): refused", type(exc).__name__)
                path.unlink(missing_ok=True)
                return CANNOT_UNDERSTAND
            report = structured_report(film, prediction, predictor.version, device_uid=self.device_uid)
            self.outbox.put(case_id, report)
            path.unlink(missing_ok=True)
            return SUCCESS

    def recover(self) -> int:
        """Answer the films a stopped node had acknowledged but not answered; how many."""
        films = sorted(self.incoming.glob("*.dcm"))
        for path in films:
            if self.answer_film(path) == OUT_OF_RESOURCES:
                log.error("the record cannot be written: %d films wait in %s", len(films), self.incoming)
                break
        return len(films)

    # ---- running --------------------------------------------------------------------

    def application_entity(self) -> AE:
        ae = AE(ae_title=self.settings.aet)
        for sop_class in ACCEPTED:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)  # C-ECHO: how a PACS admin tests the connection
        ae.require_calling_aet = sorted({peer.aet for peer in self.settings.peers})
        ae.maximum_pdu_size = 0  # no limit: whole films in few PDUs
        return ae

    def start(self) -> None:
        """Answer what a stopped node left, then listen (in threads) and start the outbox."""
        recovered = self.recover()
        if recovered:
            log.info("answered %d films left by the last run", recovered)
        handlers = [(evt.EVT_REQUESTED, self.on_requested), (evt.EVT_C_STORE, self.on_store)]
        self._server = self.application_entity().start_server((self.settings.host, self.settings.port),
                                                               block=False, evt_handlers=handlers)
        self.outbox.start()
        log.info("DICOM node %s listening on port %d", self.settings.aet, self.port)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.settings.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self.outbox.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    catch = commands.add_parser("catch-up", help="move to the node the PACS's CR/DX films it never answered")
    catch.add_argument("--hours", type=float, default=24, help="how far back to look (default 24)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name the peers' files and UIDs
    try:
        settings = NodeSettings.from_environment()
    except (SettingError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    record = CaseRecord(database_url())
    record.migrate()
    if args.command == "catch-up":
        if settings.destination is None:
            log.error("DICOM_DESTINATION is not set: no PACS to ask")
            return 2
        try:
            missing, moved = catch_up(settings.destination, settings.aet, record, args.hours)
        except ConnectionError as exc:
            log.error("%s", exc)
            return 1
        print(f"{missing} films of the last {args.hours:g} hours had no case; the PACS moved {moved} to the node")
        return 0 if moved == missing else 1
    store = ModelStore(model_store_dir())
    store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT)
    node = Node(settings, ServedModel.from_store(store, DecodeLimits()), record)
    node.start()
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
