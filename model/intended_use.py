"""Who the model is for, and what the DICOM header and the person can say against it.

The network learned pneumonia on frontal chest films of young children (one hospital,
ages about 1 to 5). An adult's film, a lateral view or another body part gets a plain
refusal with its reason, never a diagnosis. Three layers, any of which can say
"outside":

- the DICOM header, where there is one (age, view, body part: ``FilmFacts``);
- what the person knows (an age in years typed on the form or sent to the API);
- the pixels, which JPEG and PNG carry alone: ``model.population`` (adults' films and
  lateral views) and ``model.gate`` (photos, documents, other modalities). Their
  refusals are worded here (``IMAGE_MESSAGES``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from .film_facts import FilmFacts


@dataclass(frozen=True)
class IntendedUse:
    """Recorded in every checkpoint; shown on the upload page, every result and the model card."""

    min_age_years: float = 0.0
    max_age_years: float = 6.0  # younger than this
    views: tuple[str, ...] = ("PA", "AP")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX")

    def describe(self) -> str:
        return (f"frontal ({' or '.join(self.views)}) chest X-rays of children younger than "
                f"{self.max_age_years:g} years")

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**data, "views": list(self.views), "body_parts": list(self.body_parts)}

    @classmethod
    def from_dict(cls, data: dict) -> IntendedUse:
        return cls(float(data["min_age_years"]), float(data["max_age_years"]), tuple(data["views"]),
                   tuple(data["body_parts"]))


class Reason(NamedTuple):
    check: str  # "age" | "view" | "body_part" | "image"
    message: str

    def to_dict(self) -> dict:
        return {"check": self.check, "message": self.message}


def metadata_reasons(facts: FilmFacts, age_field: float | None, use: IntendedUse) -> list[Reason]:
    """The header's and the person's say. A field that is missing says nothing."""
    reasons = []
    age, source = (age_field, "as entered") if age_field is not None else (facts.age_years, "from the DICOM header")
    if age is not None and not use.min_age_years <= age < use.max_age_years:
        reasons.append(Reason("age", f"The patient's age, {format_years(age)} ({source}), is outside the intended "
                                     f"use: children younger than {use.max_age_years:g} years."))
    if facts.view and facts.view.upper() not in use.views:
        reasons.append(Reason("view", f"The DICOM header gives the view as {facts.view}, not a frontal view; this "
                                      f"model reads frontal ({' or '.join(use.views)}) chest films only."))
    if facts.body_part and facts.body_part.upper() not in use.body_parts:
        reasons.append(Reason("body_part", f"The DICOM header gives the body part as {facts.body_part}; this model "
                                           "reads chest films only."))
    return reasons


def format_years(years: float) -> str:
    if years < 2:
        return f"{years * 12:.0f} months"
    return f"{years:.0f} years" if abs(years - round(years)) < 0.05 else f"{years:.1f} years"


IMAGE_MESSAGES = {
    "not_xray": "The image does not look like a chest X-ray: it may be a photo, a document, another modality or "
                "another body part.",
    "adult": "The film looks like an adult's chest X-ray; this model was trained on young children and its "
             "answer would not be valid.",
    "lateral": "The film looks like a lateral view; this model reads frontal (PA or AP) chest films only.",
    "inverted": "The film looks inverted: bone dark and air bright, as a MONOCHROME1 film exported without "
                "inversion. Export it as it is displayed and upload it again.",
    # both parts of the gate refuse it: they cannot say which of these it is
    "unlike": "The film does not look like a young child's frontal chest X-ray: it may be an adult's film, a "
              "lateral view, another body part, or not an X-ray at all.",
}


#: Chest films show the spine and mediastinum brighter than the lungs beside them: the centre
#: band of the model input against the two lung bands. Every film of the dataset's training and
#: test splits, as it is and under the training's site processing, scores above 0, and every one
#: of them inverted scores below it.
CENTRE_COLUMNS, LUNG_COLUMNS, BAND_ROWS = (0.44, 0.56), ((0.19, 0.375), (0.625, 0.81)), (0.25, 0.75)


def polarity(inputs: np.ndarray) -> np.ndarray:
    """(N,) the centre band's mean minus the lung bands' in (N, S, S) model inputs; below 0 the
    film looks inverted (a MONOCHROME1 film exported without inversion)."""
    side = inputs.shape[-1]

    def cols(band):
        return slice(round(band[0] * side), round(band[1] * side))

    rows = slice(round(BAND_ROWS[0] * side), round(BAND_ROWS[1] * side))
    centre = inputs[:, rows, cols(CENTRE_COLUMNS)].mean(axis=(1, 2))
    lungs = np.concatenate([inputs[:, rows, cols(band)] for band in LUNG_COLUMNS], axis=2).mean(axis=(1, 2))
    return centre - lungs
