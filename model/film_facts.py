"""What a file's header says about the film: age, view, body part. A leaf module.

Read from DICOM only (JPEG and PNG carry none of it). A tag that is missing or
unreadable gives None and says nothing; it never raises. These values answer the
population check and are never logged, stored or returned.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FilmFacts:
    """What a DICOM header says about the film; None where it says nothing readable."""

    age_years: float | None = None
    view: str | None = None
    body_part: str | None = None


NO_FACTS = FilmFacts()

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def parse_dicom_age(value) -> float | None:
    """``005Y``, ``018M``, ``010W``, ``003D`` -> years; anything else -> None."""
    match = _AGE.match(str(value or ""))
    if not match:
        return None
    return int(match.group(1)) * _DAYS_PER[match.group(2).upper()] / 365.25


def parse_dicom_date(value) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def age_from_dates(birth, *study_dates) -> float | None:
    """Years between the birth date and the first readable of the study dates; None if unknown."""
    born = parse_dicom_date(birth)
    for value in study_dates:
        taken = parse_dicom_date(value)
        if born is not None and taken is not None and taken >= born:
            return (taken - born).days / 365.25
    return None
