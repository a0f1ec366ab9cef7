"""Which received images the pneumothorax models may analyse: frontal chest radiographs only.

Sites name the body part and the view in their own words ("PORT CHEST", "TORAX", "CHEST PA",
"THORAX AP"…) or not at all, so the header check reads several attributes against configurable
vocabularies (:class:`Vocabulary`, settings ``chest_body_parts``, ``non_chest_terms``,
``frontal_view_terms``, ``lateral_view_terms``):

- **Body part:** Body Part Examined; when it is absent, the Study and Series Descriptions and the
  Protocol Name. A value is chest when it contains a chest term as a word (or words) and no
  non-chest term ("THORACIC SPINE", "CHEST RIBS" are not chest films). Absent everywhere: accepted.
- **View:** View Position; then the View Code Sequence (SNOMED CT view codes, or their meanings);
  then the Series Description, the Protocol Name and the Study Description. The first source that
  names exactly one of frontal or lateral decides ("CHEST PA AND LATERAL" names both and decides
  nothing). Oblique and other views are not frontal.
- When no header tells the view, :func:`assess` says so (``view_known`` False) and the worker
  checks the picture itself (:func:`looks_frontal`): a lateral radiograph sent without a view is not
  read as a frontal one.

The header check works on datasets read with ``stop_before_pixels``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pydicom
from scipy import ndimage

from config.settings import (
    DEFAULT_CHEST_BODY_PARTS,
    DEFAULT_FRONTAL_VIEW_TERMS,
    DEFAULT_LATERAL_VIEW_TERMS,
    DEFAULT_NON_CHEST_TERMS,
    Settings,
)
from worker.inference.measure import small_lung_fields

__all__ = [
    "FOR_PROCESSING_SOP_CLASSES",
    "FRONTAL_VIEW_CODES",
    "LATERAL_VIEW_CODES",
    "RADIOGRAPH_MODALITIES",
    "Eligibility",
    "Vocabulary",
    "assess",
    "frontal_check_reason",
    "ineligibility_reason",
    "looks_frontal",
]

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
FRONTAL_VIEW_CODES = frozenset({"399348003", "272479007", "399033003"})
"""SNOMED CT (CID 4010): antero-posterior, postero-anterior, frontal."""
LATERAL_VIEW_CODES = frozenset({"399067008", "399173006", "399198007", "399352003", "399260004"})
"""SNOMED CT (CID 4010): lateral, left lateral, right lateral, latero-medial, medio-lateral."""
DESCRIPTION_KEYWORDS = ("SeriesDescription", "ProtocolName", "StudyDescription")
FOR_PROCESSING_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
})
"""Storage SOP classes of raw detector data: For Processing even when Presentation Intent Type is absent."""


def _words(text: str) -> str:
    """Upper-case words separated by single spaces, padded: ``" PORT CHEST "``, for whole-word search."""
    return " " + " ".join(re.findall(r"[A-Z0-9]+", text.upper())) + " "


def _names(text: str, terms: Iterable[str]) -> str | None:
    """The first of ``terms`` that ``text`` contains as a whole word or words, else None."""
    words = _words(text)
    for term in terms:
        if _words(term) != "  " and _words(term) in words:
            return term
    return None


@dataclass(frozen=True)
class Vocabulary:
    """The words a site uses for chest, for other body parts, and for frontal and lateral views."""

    chest: tuple[str, ...] = DEFAULT_CHEST_BODY_PARTS
    non_chest: tuple[str, ...] = DEFAULT_NON_CHEST_TERMS
    frontal: tuple[str, ...] = DEFAULT_FRONTAL_VIEW_TERMS
    lateral: tuple[str, ...] = DEFAULT_LATERAL_VIEW_TERMS

    @classmethod
    def from_settings(cls, settings: Settings) -> "Vocabulary":
        return cls(
            tuple(settings.chest_body_parts), tuple(settings.non_chest_terms),
            tuple(settings.frontal_view_terms), tuple(settings.lateral_view_terms),
        )

    def view_named(self, text: str) -> str | None:
        """"frontal" or "lateral" when ``text`` names exactly one of them, else None."""
        frontal, lateral = _names(text, self.frontal), _names(text, self.lateral)
        if frontal and not lateral:
            return "frontal"
        if lateral and not frontal:
            return "lateral"
        return None


@dataclass(frozen=True)
class Eligibility:
    """The header's answer: ``reason`` why not, or None; ``view_known`` whether a header attribute
    said the image is frontal (when False, the picture is checked: :func:`looks_frontal`)."""

    reason: str | None
    view_known: bool = True


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


def _for_processing(ds: pydicom.Dataset) -> bool:
    """Presentation Intent Type FOR PROCESSING, or a For Processing SOP class (the data set's, else
    the file meta's Media Storage SOP Class)."""
    if _text(ds, "PresentationIntentType") == "FOR PROCESSING":
        return True
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    if not sop_class:
        meta = getattr(ds, "file_meta", None)
        sop_class = str((meta.get("MediaStorageSOPClassUID") if meta is not None else None) or "").strip()
    return sop_class in FOR_PROCESSING_SOP_CLASSES


def _body_part_reason(ds: pydicom.Dataset, words: Vocabulary) -> str | None:
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        if _names(body_part, words.chest) and not _names(body_part, words.non_chest):
            return None
        return f"body part {body_part} is not chest"
    for keyword in DESCRIPTION_KEYWORDS:
        text = _text(ds, keyword)
        other = _names(text, words.non_chest)
        if other and not _names(text, words.chest):
            return f"no Body Part Examined, and the {_spaced(keyword)} names {other.upper()}, not chest"
        if _names(text, words.chest):
            return None if not other else f"the {_spaced(keyword)} names {other.upper()}, not a chest film"
    return None


def _spaced(keyword: str) -> str:
    """``"SeriesDescription"`` -> ``"series description"``."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", keyword).lower()


def _view(ds: pydicom.Dataset, words: Vocabulary) -> tuple[str | None, str]:
    """("frontal" | "lateral" | "other" | None, where it was read)."""
    view = _text(ds, "ViewPosition")
    if view:
        named = words.view_named(view)
        return named or "other", f"ViewPosition {view}"
    for item in ds.get("ViewCodeSequence") or []:
        code, meaning = str(item.get("CodeValue", "")).strip(), str(item.get("CodeMeaning", "")).strip()
        if code in FRONTAL_VIEW_CODES:
            return "frontal", f"View Code {meaning or code}"
        if code in LATERAL_VIEW_CODES:
            return "lateral", f"View Code {meaning or code}"
        named = words.view_named(meaning)
        if named:
            return named, f"View Code {meaning}"
    for keyword in DESCRIPTION_KEYWORDS:
        text = _text(ds, keyword)
        named = words.view_named(text)
        if named:
            return named, f"{_spaced(keyword)} {text}"
    return None, ""


def assess(ds: pydicom.Dataset, words: Vocabulary | None = None) -> Eligibility:
    """Whether the header allows analysis (see the module docstring), and whether it told the view.

    Analysed: single-frame grayscale CR or DX images of the chest in a frontal view and, for DX,
    not For Processing (Presentation Intent Type, or a For Processing SOP class: raw detector data,
    whose look depends on the vendor's processing that Pleura does not have).
    """
    words = words or Vocabulary()
    modality = _text(ds, "Modality")
    if modality not in RADIOGRAPH_MODALITIES:
        return Eligibility(f"modality {modality or '(absent)'} is not CR or DX")

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
        return Eligibility(f"not a single-frame grayscale image ({', '.join(detail)})")

    if _for_processing(ds):
        return Eligibility(
            "image is For Processing (raw detector data), not For Presentation: Pleura reads the "
            "processed image the radiologist sees"
        )

    reason = _body_part_reason(ds, words)
    if reason:
        return Eligibility(reason)

    view, where = _view(ds, words)
    if view == "lateral":
        return Eligibility(f"lateral view ({where})")
    if view == "other":
        return Eligibility(f"view position {where.removeprefix('ViewPosition ')} is not a frontal view (PA or AP)")
    return Eligibility(None, view_known=view == "frontal")


def ineligibility_reason(ds: pydicom.Dataset, words: Vocabulary | None = None) -> str | None:
    """None when the header allows analysis, else why not, in words for the worklist and the report."""
    return assess(ds, words).reason


# --- the picture itself, when no header tells the view -------------------------------------------

MIN_FIELD_SHARE = 0.2
"""Each of the two lung fields holds at least this share of their combined area."""
MAX_COLUMN_OVERLAP = 0.2
"""The two fields' column ranges overlap by at most this share of the narrower one (side by side)."""
MIN_ROW_OVERLAP = 0.5
"""Their row ranges overlap by at least this share of the shorter one (at the same height)."""


def looks_frontal(image: np.ndarray) -> bool:
    """Whether a displayed radiograph (bright = dense) shows two lung fields side by side, as a
    frontal chest film does; a lateral shows the lungs superimposed as one field.

    The lung fields are :func:`~worker.inference.measure.small_lung_fields` (dark regions inside the
    body's outline, the two largest). Frontal: two fields, each at least :data:`MIN_FIELD_SHARE`
    of their combined area, whose column ranges overlap by at most :data:`MAX_COLUMN_OVERLAP` of
    the narrower and whose row ranges overlap by at least :data:`MIN_ROW_OVERLAP` of the shorter.
    """
    fields = small_lung_fields(np.asarray(image))
    if fields is None:
        return False
    labels, count = ndimage.label(fields)
    if count < 2:
        return False
    areas = ndimage.sum_labels(fields, labels, index=np.arange(1, count + 1))
    largest = np.argsort(areas)[::-1][:2]
    if areas[largest].min() < MIN_FIELD_SHARE * areas[largest].sum():
        return False
    boxes = ndimage.find_objects(labels)
    first, second = (boxes[i] for i in largest)

    def overlap(a: slice, b: slice) -> float:
        shared = min(a.stop, b.stop) - max(a.start, b.start)
        return max(shared, 0) / min(a.stop - a.start, b.stop - b.start)

    return overlap(first[1], second[1]) <= MAX_COLUMN_OVERLAP and overlap(first[0], second[0]) >= MIN_ROW_OVERLAP


def frontal_check_reason(image: np.ndarray) -> str | None:
    """None when the picture of an image without a view in its header looks frontal, else why not."""
    if looks_frontal(image):
        return None
    return (
        "no view in the header (View Position, View Code Sequence, descriptions) and the picture "
        "does not show two lung fields side by side, as a frontal chest radiograph does"
    )
