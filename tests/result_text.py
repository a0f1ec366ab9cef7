"""The check that no file path and no UID is in the free text of an object Pleura wrote.

Reasons and comments reach the PACS, the worklist and the RIS: they say what happened in words.
Used by tests/test_zz_result_text.py and, for every object the whole run wrote, by conftest.py at
the end of the session (all of pytest-xdist's workers together).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from contract.marks import MANUFACTURER

TEXT_VRS = {"LO", "LT", "ST", "UT", "SH", "UC"}
PATH = re.compile(r"(?:^|[\s(:'\"])(?:/|[A-Za-z]:\\)[\w.-]+[/\\]")
UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")
NOT_FREE_TEXT = {"CodeValue", "CodingSchemeVersion", "LongCodeValue"}


def _texts(ds: Dataset, where: str = "") -> Iterator[tuple[str, str]]:
    """(element path, value) of every text value in ``ds``, sequences included."""
    for element in ds:
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from _texts(item, f"{where}{element.keyword}[{index}].")
        elif element.VR in TEXT_VRS and element.keyword not in NOT_FREE_TEXT and element.value not in (None, ""):
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                yield f"{where}{element.keyword}", str(value)


def offending_texts(path: Path) -> list[str]:
    ds = pydicom.dcmread(path)
    return [
        f"{path.name} {keyword}: {value!r}"
        for keyword, value in _texts(ds)
        if PATH.search(value) or UID.search(value)
    ]


def pleura_results(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*.dcm"):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if str(header.get("Manufacturer", "")) == MANUFACTURER:
            found.append(path)
    return found
