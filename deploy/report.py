"""The answer as a DICOM structured report in the film's own study (highdicom).

A Comprehensive 3D SR holding a TID 1500 measurement report, as IHE AI Results asks: a new
series in the film's study (its Study Instance UID and patient module, copied from the film
by highdicom as the standard requires; nothing else of the header), a reference to the film,
the model version as algorithm identification and in ContributingEquipmentSequence,
VerificationFlag UNVERIFIED, and a series description that says decision support.

An answered film: the finding Pneumonia (SNOMED CT 233604007) Present or Absent, the
calibrated probability and the threshold. A refused film: "not assessed" and a code for each
reason, with no finding, no probability and no threshold. Codes of our own use the local
scheme ``99PNEUMO`` (the standard's way for codes no public scheme has).
"""
from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
PROCEDURE = Code("399208008", "SCT", "Plain X-ray of chest")
NO_UNITS = Code("1", "UCUM", "no units")
LOCAL = "99PNEUMO"
ASSESSMENT = Code("assessment", LOCAL, "Assessment by the screening tool")
NOT_ASSESSED = Code("not-assessed", LOCAL, "Not assessed: outside the intended use")
REASONS = {
    "age": Code("outside-age", LOCAL, "Outside the intended use: the patient's age"),
    "view": Code("outside-view", LOCAL, "Outside the intended use: not a frontal view"),
    "body_part": Code("outside-body-part", LOCAL, "Outside the intended use: not the chest"),
    "image": Code("outside-image", LOCAL, "Outside the intended use: the film's appearance"),
}
MANUFACTURER = "Pneumonia screening (open source)"
ALGORITHM = "pneumonia-stn-cnn"
SERIES_DESCRIPTION = "AI pneumonia screening: decision support, not a diagnosis"
SERIES_NUMBER = 9701


def structured_report(film: Dataset, prediction, version: str, *, device_uid: str, sr_uid: str | None = None,
                      series_uid: str | None = None) -> hd.sr.Comprehensive3DSR:
    """The report of ``prediction`` (a ``model.Prediction``) for ``film``, made by model ``version``."""
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM, version=version)
    if prediction.in_distribution:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="pneumonia screening"),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(PNEUMONIA,
                                                                 PRESENT if prediction.is_pneumonia else ABSENT)],
            measurements=[hd.sr.Measurement(codes.DCM.Probability, round(float(prediction.probability), 6), NO_UNITS,
                                            algorithm_id=algorithm),
                          hd.sr.Measurement(codes.DCM.ThresholdValue, round(float(prediction.threshold), 6), NO_UNITS,
                                            algorithm_id=algorithm)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(film.SOPClassUID, film.SOPInstanceUID)],
        )
    else:
        checks = dict.fromkeys(reason.check for reason in prediction.population_reasons)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="pneumonia screening"),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(ASSESSMENT, NOT_ASSESSED)]
            + [hd.sr.QualitativeEvaluation(ASSESSMENT, REASONS[check]) for check in checks if check in REASONS],
            source_images=[hd.sr.SourceImageForMeasurementGroup(film.SOPClassUID, film.SOPInstanceUID)],
        )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="pneumonia screening node", manufacturer_name=MANUFACTURER, model_name=version))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=PROCEDURE, imaging_measurements=[group])
    equipment = hd.ContributingEquipment(
        MANUFACTURER, codes.DCM.ProcessingEquipment, manufacturer_model_name=ALGORITHM, software_versions=version,
        contribution_description=f"Processing Algorithm: {ALGORITHM} {version}, decision support, not a diagnosis")
    sr = hd.sr.Comprehensive3DSR(
        evidence=[film], content=report[0], series_instance_uid=series_uid or generate_uid(),
        series_number=SERIES_NUMBER, sop_instance_uid=sr_uid or generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        contributing_equipment=[equipment], series_description=SERIES_DESCRIPTION)
    return sr
