"""What a training data set reader returns: a :class:`DatasetIndex` of :class:`Example` images,
the :class:`Problem` images left out, and the :class:`DatasetError` that stops a reader. Shared
by the readers of every layout (:mod:`training.datasets`, :mod:`training.archive`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from config.errors import PleuraError
from training.rle import rle_decode

DatasetKind = Literal["siim", "cxr14", "archive", "merged"]


class DatasetError(PleuraError, ValueError):
    """Input that cannot be used; the message names the file and, where there is one, the CSV row."""


@dataclass(frozen=True)
class Problem:
    """An image left out (``skip_bad``): where, and why."""

    file: Path
    row: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" if self.row is not None else str(self.file)
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Example:
    """One labelled image."""

    image_id: str
    path: Path
    patient_id: str
    positive: bool
    rles: tuple[str, ...] = ()
    """SIIM-ACR: every RLE row of the image (OR'ed); empty for a data set without masks."""
    rows: tuple[int, ...] = ()
    """The CSV rows (1 = the header) the label came from, for messages."""
    height: int | None = None
    width: int | None = None
    synthetic: bool = False
    """Made by Pleura's generator (PatientName SYNTHETIC^DEMO): a model trained on it is a demo."""

    def mask(self) -> np.ndarray:
        """The union of the image's RLE masks at its full size, bool (Rows, Columns)."""
        if self.height is None or self.width is None:
            raise ValueError(f"{self.path}: no mask size known (not a segmentation data set)")
        mask = np.zeros((self.height, self.width), dtype=bool)
        for rle in self.rles:
            mask |= rle_decode(rle, width=self.width, height=self.height)
        return mask


@dataclass
class DatasetIndex:
    """The usable examples of a data set directory, and what was left out."""

    kind: DatasetKind
    root: Path
    label_file: Path
    examples: list[Example]
    problems: list[Problem] = field(default_factory=list)
    unlabelled: list[Path] = field(default_factory=list)
    parts: list[DatasetIndex] = field(default_factory=list)
    """For a merged index: the data sets it was made of (:func:`merge_datasets`)."""

    @property
    def has_masks(self) -> bool:
        if self.kind == "merged":
            return all(part.has_masks for part in self.parts)
        return self.kind in ("siim", "archive")

    @property
    def positives(self) -> int:
        return sum(example.positive for example in self.examples)

    def describe(self) -> str:
        return (
            f"{self.kind} data set {self.root}: {len(self.examples)} images ({self.positives} with pneumothorax) "
            f"from {len({e.patient_id for e in self.examples})} patients; {len(self.problems)} skipped, "
            f"{len(self.unlabelled)} without a row in {self.label_file.name}"
        )
