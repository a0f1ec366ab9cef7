"""Deterministic UIDs for result objects.

A result's UIDs are derived from what it was made from, so analysing the same image again with the
same model gives the same UIDs (the PACS replaces the object instead of storing a duplicate), while
a new model version gives new ones. The UIDs are ISO/IEC 9834-8 UUID-derived OIDs (``2.25.<n>``),
which need no registered root.

Every UID inside a result is derived too, not only its SOP Instance and Series UIDs: highdicom
draws some at random (a SEG's Dimension Organization UID), and :func:`replace_uid` swaps them for
derived ones, so that one SOP Instance UID always names the same content (DICOM forbids two objects
with one UID and different content).

``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` is not used: with ``prefix=None`` it
ignores the entropy sources and returns a random UUID-based UID.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import pydicom

from contract.bundle import ModelIdentity

PLEURA_UID_NAMESPACE = uuid.UUID("6b1d3c52-8f0e-5a43-9e2c-3f4a8d7b1e90")
"""Namespace of Pleura's name-based (version 5) UUIDs; changing it changes every result UID."""


def result_uid(*parts: str) -> str:
    """A ``2.25.`` UID that is a pure function of ``parts`` (order matters, no separator clashes)."""
    if not parts:
        raise ValueError("result_uid needs at least one part")
    name = json.dumps([str(part) for part in parts], ensure_ascii=False)
    return f"2.25.{uuid.uuid5(PLEURA_UID_NAMESPACE, name).int}"


def instance_uid(source_sop_instance_uid: str, model: ModelIdentity, kind: str) -> str:
    """SOP Instance UID of the ``kind`` ("SEG", "SR", ...) result made from one source image."""
    return result_uid(source_sop_instance_uid, model.name, model.version, kind)


def series_uid(study_instance_uid: str, model: ModelIdentity, kind: str) -> str:
    """Series Instance UID of the ``kind`` results one model version makes within one study."""
    return result_uid(study_instance_uid, model.name, model.version, kind, "series")


def device_uid(model: ModelIdentity) -> str:
    """Device Observer UID of the model (the same for every report one model version writes)."""
    return result_uid(model.manufacturer, model.name, model.version, "device")


def study_result_uid(study_instance_uid: str, source_sop_instance_uids: Sequence[str], model: ModelIdentity,
                     kind: str) -> str:
    """SOP Instance UID of a ``kind`` result about a set of images of one study (the order of the
    images does not matter)."""
    return result_uid(study_instance_uid, *sorted(set(source_sop_instance_uids)), model.name, model.version, kind)


def dimension_organization_uid(sop_instance_uid: str) -> str:
    """The Dimension Organization UID of the multi-frame result ``sop_instance_uid`` (highdicom
    draws a random one)."""
    return result_uid(sop_instance_uid, "DIMENSION-ORGANIZATION")


def replace_uid(dataset: pydicom.Dataset, old: str, new: str) -> int:
    """Replace the UID ``old`` by ``new`` in every UI element of ``dataset``, nested sequences
    included; the number of values replaced."""
    replaced = 0
    for element in dataset:
        if element.VR == "SQ":
            replaced += sum(replace_uid(item, old, new) for item in element.value)
        elif element.VR == "UI" and element.value is not None:
            if isinstance(element.value, (list, pydicom.multival.MultiValue)):
                values = [new if str(value) == old else value for value in element.value]
                replaced += sum(str(value) == old for value in element.value)
                element.value = values
            elif str(element.value) == old:
                element.value = new
                replaced += 1
    return replaced
