"""The DICOM node with a PACS of pynetdicom's on loopback: films in, structured reports out."""
from __future__ import annotations

import io
import threading
import time

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from deploy import outbox as outbox_module
from deploy.dicom import Node, NodeSettings, Peer
from deploy.outbox import Destination
from deploy.report import ABSENT, PNEUMONIA, PRESENT
from harness.dicom_files import PATIENT_ID, PATIENT_NAME, dx_film

SENDER = "TESTPACS"


class FakePacs:
    """A storage SCP that keeps what it receives and answers with ``status``."""

    def __init__(self):
        self.received: list[pydicom.Dataset] = []
        self.status = 0x0000
        self.calls = 0
        self.arrived = threading.Event()
        ae = AE(ae_title="FAKEPACS")
        ae.add_supported_context(Comprehensive3DSRStorage)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)])
        self.port = self.server.server_address[1]

    def store(self, event) -> int:
        self.calls += 1
        if self.status == 0x0000:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            self.received.append(dataset)
            self.arrived.set()
        return self.status

    def wait_for(self, count: int, timeout: float = 10.0) -> list[pydicom.Dataset]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def pacs():
    pacs = FakePacs()
    yield pacs
    pacs.stop()


@pytest.fixture
def make_node(tmp_path, served, record, pacs, monkeypatch):
    monkeypatch.setattr(outbox_module, "FIRST_WAIT_S", 0.2)
    monkeypatch.setattr(outbox_module, "MAX_WAIT_S", 0.5)
    nodes = []

    def make(destination_port: int | None = None) -> Node:
        settings = NodeSettings(aet="PNEUMONIA", port=0, host="127.0.0.1", peers=(Peer(SENDER, "127.0.0.1"),),
                                destination=Destination("FAKEPACS", "127.0.0.1", destination_port or pacs.port),
                                spool=tmp_path / "spool")
        node = Node(settings, served, record)
        node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def send(node: Node, film: pydicom.Dataset, calling: str = SENDER, sop_class=DigitalXRayImageStorageForPresentation):
    """The C-STORE status the node answers, or why there was none."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class, [film.file_meta.TransferSyntaxUID])
    if sop_class != DigitalXRayImageStorageForPresentation:  # with one the node takes: the association stands
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMONIA")
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "no association"
    try:
        status = assoc.send_c_store(film)
        return status.Status if status else "no answer"
    except ValueError:  # no accepted presentation context for the film's SOP class
        return "context refused"
    finally:
        assoc.release()


def eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def content(report: pydicom.Dataset) -> dict[str, list]:
    """Concept name -> values (codes' meanings, numbers) anywhere in the report's content tree."""
    found: dict[str, list] = {}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if "ConceptCodeSequence" in item:
                found.setdefault(name, []).append(item.ConceptCodeSequence[0].CodeValue)
            if "MeasuredValueSequence" in item:
                found.setdefault(name, []).append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(report.ContentSequence)
    return found


def test_a_film_is_answered_into_its_study_with_the_api_s_decision(make_node, pacs, record, pneumonia_pixels,
                                                                   uploads):
    node = make_node()
    film = dx_film(pneumonia_pixels, tags={"PatientAge": "004Y"})
    assert send(node, film) == 0x0000
    case_id, queued = record.case_of_instance(film.SOPInstanceUID)
    assert queued and not list(node.incoming.iterdir())  # answered, and the film deleted
    report = pacs.wait_for(1)[0]
    assert report.StudyInstanceUID == film.StudyInstanceUID and report.SeriesInstanceUID != film.SeriesInstanceUID
    assert (report.PatientName, report.PatientID) == (PATIENT_NAME, PATIENT_ID)  # the patient module, as required
    assert report.VerificationFlag == "UNVERIFIED" and "not a diagnosis" in report.SeriesDescription
    assert report.ContributingEquipmentSequence[0].SoftwareVersions == node.served.current().version
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    buffer = io.BytesIO()
    film.save_as(buffer, enforce_file_format=True)
    api = uploads.api(buffer.getvalue(), "film.dcm").get_json()
    found = content(report)
    assert found[PNEUMONIA.meaning] == [(PRESENT if api["label"] == "PNEUMONIA" else ABSENT).value]
    assert found["Probability"][0] == pytest.approx(api["probability"], abs=1e-5)
    case = record.case(case_id)
    assert case.source == "dicom" and case.study_uid == film.StudyInstanceUID
    assert PATIENT_ID not in repr(vars(case)) and PATIENT_NAME not in repr(vars(case))


def test_the_same_instance_sent_again_is_acknowledged_and_answered_once(make_node, pacs, record, pneumonia_pixels):
    node = make_node()
    film = dx_film(pneumonia_pixels)
    assert send(node, film) == 0x0000 and send(node, film) == 0x0000
    assert record.count() == 1
    time.sleep(1.0)
    assert len(pacs.wait_for(1)) == 1


def test_unknown_senders_and_other_sop_classes_are_rejected(make_node, record, pneumonia_pixels):
    node = make_node()
    assert send(node, dx_film(pneumonia_pixels), calling="STRANGER") == "rejected"
    ct = dx_film(pneumonia_pixels, sop_class=CTImageStorage)
    assert send(node, ct, sop_class=CTImageStorage) == "context refused"
    assert record.count() == 0


def test_an_adult_film_gets_a_refusal_report_with_no_probability(make_node, pacs, pneumonia_pixels):
    node = make_node()
    assert send(node, dx_film(pneumonia_pixels, tags={"PatientAge": "045Y"})) == 0x0000
    found = content(pacs.wait_for(1)[0])
    assert found["Assessment by the screening tool"][:2] == ["not-assessed", "outside-age"]
    assert PNEUMONIA.meaning not in found and "Probability" not in found and "Threshold Value" not in found


def test_a_jpeg_2000_film_decodes(make_node, record, pneumonia_pixels):
    node = make_node()
    film = dx_film(pneumonia_pixels, transfer_syntax=JPEG2000Lossless)
    assert send(node, film) == 0x0000
    assert record.case(record.case_of_instance(film.SOPInstanceUID)[0]).decision is not None


def test_reports_wait_while_the_pacs_is_down_and_leave_when_it_is_back(make_node, record, pneumonia_pixels):
    node = make_node(destination_port=1)  # nothing listens there
    film = dx_film(pneumonia_pixels)
    assert send(node, film) == 0x0000
    time.sleep(1.0)
    figures = record.delivery_figures()
    assert figures["pending"] == 1 and figures["oldest_pending"] is not None, figures
    late = FakePacs()
    try:
        node.outbox.destination = Destination("FAKEPACS", "127.0.0.1", late.port)
        reports = late.wait_for(1, timeout=5)
        assert len(reports) == 1 and reports[0].StudyInstanceUID == film.StudyInstanceUID
        assert eventually(lambda: record.delivery_figures()["sent"] == 1)  # marked once the PACS has answered
    finally:
        late.stop()


def test_a_permanent_refusal_by_the_pacs_is_kept_apart_and_not_retried(make_node, pacs, record, pneumonia_pixels):
    pacs.status = 0xA900  # dataset does not match SOP class: sending it again cannot help
    node = make_node()
    assert send(node, dx_film(pneumonia_pixels)) == 0x0000
    assert eventually(lambda: record.delivery_figures()["failed"] == 1)
    time.sleep(1.0)  # longer than the outbox's waits: nothing is sent again
    assert record.delivery_figures()["pending"] == 0 and pacs.calls == 1
    assert node.outbox.deliver_due() == 0


def test_a_film_acknowledged_before_a_crash_is_answered_at_start(tmp_path, make_node, pacs, record, pneumonia_pixels):
    film = dx_film(pneumonia_pixels)
    spool = tmp_path / "spool" / "incoming"
    spool.mkdir(parents=True)
    film.save_as(spool / "left-by-a-killed-node.dcm", enforce_file_format=True)
    make_node()
    assert record.case_of_instance(film.SOPInstanceUID)[1]
    assert len(pacs.wait_for(1)) == 1 and not list(spool.iterdir())


def test_the_worklist_the_case_and_the_monitor_show_where_each_report_stands(make_node, pacs, record, make_app,
                                                                             pneumonia_pixels):
    pacs.status = 0xC000
    node = make_node()
    film = dx_film(pneumonia_pixels)
    assert send(node, film) == 0x0000
    case_id = record.case_of_instance(film.SOPInstanceUID)[0]
    assert eventually(lambda: record.delivery_figures()["failed"] == 1)
    client = make_app(DATABASE_URL=record.url).test_client()
    assert "PACS (report refused by the PACS)" in client.get("/cases").get_data(as_text=True)
    page = client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert "refused by the PACS for good: the PACS refused it (status 0xC000)" in page
    assert client.get(f"/api/v1/cases/{case_id}").get_json()["reports"][0]["state"] == "failed"
    monitor = client.get("/monitor").get_data(as_text=True)
    assert 'id="delivery-table"' in monitor and "were refused by the PACS for good" in monitor


def test_a_film_no_decoder_reads_is_refused_as_not_understood_and_not_kept(make_node, record, pneumonia_pixels):
    node = make_node()
    film = dx_film(pneumonia_pixels)
    film.PixelData = film.PixelData[:1000]  # far shorter than its rows and columns say
    assert send(node, film) == 0xC000
    assert record.count() == 0 and not list(node.incoming.iterdir())


def test_a_film_whose_report_could_not_be_queued_is_answered_when_sent_again(make_node, pacs, record,
                                                                             pneumonia_pixels, monkeypatch):
    node = make_node()
    film = dx_film(pneumonia_pixels)
    real = record.add_delivery

    def full(*args):
        raise OSError("database full")

    monkeypatch.setattr(record, "add_delivery", full)
    assert send(node, film) == 0xA700  # the case is written, its report is not: the PACS keeps the film
    monkeypatch.setattr(record, "add_delivery", real)
    assert send(node, film) == 0x0000
    assert record.count() == 1 and len(pacs.wait_for(1)) == 1


def test_a_pacs_that_takes_no_such_report_keeps_it_waiting_with_the_reason(make_node, record, pneumonia_pixels):
    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(CTImageStorage)  # stores images, not structured reports: it accepts no context of ours
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        node = make_node(destination_port=server.server_address[1])
        film = dx_film(pneumonia_pixels)
        assert send(node, film) == 0x0000
        case_id = record.case_of_instance(film.SOPInstanceUID)[0]
        assert eventually(lambda: record.case(case_id).deliveries[0].attempts >= 2)
        delivery = record.case(case_id).deliveries[0]
        assert delivery.state == "pending" and "Comprehensive 3D SR" in delivery.last_error  # on the case, /monitor
    finally:
        server.shutdown()
