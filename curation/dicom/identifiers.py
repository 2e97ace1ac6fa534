"""The identifying DICOM attributes (PS3.15 basic confidentiality profile) the scrubber learns,
tagged by how `curation.privacy.scrub.Scrubber` matches them."""

from __future__ import annotations

from typing import Any

# DICOM PS3.15 basic-profile attributes read here, by how the scrubber matches them.
IDENTIFYING: dict[str, tuple[str, ...]] = {
    "name": ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
             "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
             "NameOfPhysiciansReadingStudy", "RequestingPhysician", "ResponsiblePerson"),
    "id": ("PatientID", "IssuerOfPatientID", "OtherPatientIDs", "AccessionNumber", "StudyID",
           "MedicalRecordLocator", "PatientTelephoneNumbers", "DeviceSerialNumber", "StationName"),
    "date": ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
             "AcquisitionDateTime", "InstanceCreationDate"),
    "phrase": ("InstitutionName", "InstitutionAddress", "PatientAddress", "InstitutionalDepartmentName"),
    "uid": ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"),
}


def identifying_values(ds: Any) -> set[tuple[str, str]]:
    """(kind, value) of every identifying attribute present (multi-values one by one)."""
    found: set[tuple[str, str]] = set()
    for kind, keywords in IDENTIFYING.items():
        for keyword in keywords:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            many = isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
            values = list(value) if many else [value]
            found |= {(kind, str(v).strip()) for v in values if str(v).strip()}
    for item in ds.get("OtherPatientIDsSequence") or []:
        if item.get("PatientID"):
            found.add(("id", str(item.PatientID).strip()))
    return found
