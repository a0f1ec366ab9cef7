"""Which received images the pneumothorax models may analyse: frontal chest radiographs only.

The check reads the header only, so it works on datasets read with ``stop_before_pixels``.
"""

from __future__ import annotations

import pydicom

__all__ = ["CHEST_BODY_PARTS", "FRONTAL_VIEWS", "LATERAL_VIEWS", "RADIOGRAPH_MODALITIES", "ineligibility_reason"]

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX"})
"""Body Part Examined values taken as chest; an absent or empty value is accepted too."""
FRONTAL_VIEWS = frozenset({"PA", "AP"})
"""View Position values taken as frontal; an absent or empty value is accepted too."""
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLO", "RLO"})
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().upper()


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def ineligibility_reason(ds: pydicom.Dataset) -> str | None:
    """None when the image should be analysed, else why not, in words for the worklist and the logs.

    Analysed: single-frame grayscale CR or DX images of the chest (Body Part Examined CHEST, THORAX
    or absent) in a frontal view (View Position PA, AP or absent), and, for DX, not For Processing.
    """
    modality = _text(ds, "Modality")
    if modality not in RADIOGRAPH_MODALITIES:
        return f"modality {modality or '(absent)'} is not CR or DX"

    samples = _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1)
    photometric = _text(ds, "PhotometricInterpretation")
    if samples != 1 or frames is None or frames > 1 or (photometric and photometric not in GRAYSCALE):
        detail = []
        if samples != 1:
            detail.append(f"SamplesPerPixel {ds.get('SamplesPerPixel')}")
        if frames is None or frames > 1:
            detail.append(f"NumberOfFrames {ds.get('NumberOfFrames')}")
        if photometric and photometric not in GRAYSCALE:
            detail.append(f"PhotometricInterpretation {photometric}")
        return f"not a single-frame grayscale image ({', '.join(detail)})"

    if _text(ds, "PresentationIntentType") == "FOR PROCESSING":
        return "image is For Processing (raw detector data), not For Presentation"

    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part not in CHEST_BODY_PARTS:
        return f"body part {body_part} is not chest"

    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        return f"lateral view (ViewPosition {view})"
    if view and view not in FRONTAL_VIEWS:
        return f"view position {view} is not a frontal view (PA or AP)"
    return None
