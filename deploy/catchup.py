"""Catch-up: films the PACS holds but the node never answered (a router dropped them).

    python -m deploy.dicom catch-up [--hours 24]

Asks the PACS (``DICOM_DESTINATION``, which must accept C-FIND and C-MOVE from our AE title
and know it as a destination) for the CR and DX studies of the last hours, lists their
instances, and moves to the node (C-MOVE to our own AE title) every film the case record
has no case for; the running node answers them as any film it receives.
"""
from __future__ import annotations

import datetime as dt
import logging

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from app.cases import CaseRecord

from .outbox import Destination

log = logging.getLogger("dicom")
MODALITIES = ("CR", "DX")


def _find(assoc, level: str, **keys) -> list[Dataset]:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    found = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            found.append(identifier)
    return found


def missing_films(pacs: Destination, calling_aet: str, record: CaseRecord, hours: float) -> list[tuple[str, str, str]]:
    """(study, series, instance) UIDs of the CR and DX films of the last ``hours`` without a case."""
    since = dt.datetime.now() - dt.timedelta(hours=hours)  # the PACS's dates are local
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet)
    if not assoc.is_established:
        raise ConnectionError(f"the PACS {pacs.aet} at {pacs.host}:{pacs.port} refused or did not answer C-FIND")
    missing = []
    try:
        studies = _find(assoc, "STUDY", StudyInstanceUID="", StudyDate=f"{since:%Y%m%d}-{dt.date.today():%Y%m%d}")
        for study in studies:
            for series in _find(assoc, "SERIES", StudyInstanceUID=study.StudyInstanceUID, SeriesInstanceUID="",
                                Modality=""):
                if series.get("Modality") not in MODALITIES:
                    continue
                for image in _find(assoc, "IMAGE", StudyInstanceUID=study.StudyInstanceUID,
                                   SeriesInstanceUID=series.SeriesInstanceUID, SOPInstanceUID=""):
                    if record.case_of_instance(str(image.SOPInstanceUID)) is None:
                        missing.append((str(study.StudyInstanceUID), str(series.SeriesInstanceUID),
                                        str(image.SOPInstanceUID)))
    finally:
        assoc.release()
    return missing


def catch_up(pacs: Destination, node_aet: str, record: CaseRecord, hours: float) -> tuple[int, int]:
    """(films found missing, films the PACS moved to the node)."""
    missing = missing_films(pacs, node_aet, record, hours)
    if not missing:
        return 0, 0
    ae = AE(ae_title=node_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet)
    if not assoc.is_established:
        raise ConnectionError(f"the PACS {pacs.aet} refused or did not answer C-MOVE")
    moved = 0
    try:
        for study_uid, series_uid, sop_uid in missing:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = study_uid, series_uid, sop_uid
            for status, _ in assoc.send_c_move(query, node_aet, StudyRootQueryRetrieveInformationModelMove):
                if status and status.Status == 0x0000:
                    moved += 1
    finally:
        assoc.release()
    log.info("catch-up: %d films without a case, %d moved to the node", len(missing), moved)
    return len(missing), moved
