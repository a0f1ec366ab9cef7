"""Stratified, patient-level train / validation / test splits, written to a file so a run can be repeated.

Patients, not images, are assigned: a patient is positive when any of their images is, the
patients of each class are shuffled by the seed and cut in the given ratios (rounded per class),
and every image follows its patient. So no patient is in two splits and each split has about the
data set's share of positive patients.

The split file is a CSV with ``image_id, patient_id, positive, split``; reading it back checks that
it covers the data set exactly and that no patient crosses splits.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.datasets import DatasetError, Example

__all__ = ["SPLIT_NAMES", "make_splits", "read_splits", "split_counts", "write_splits"]

SPLIT_NAMES = ("train", "val", "test")
SPLIT_COLUMNS = ["image_id", "patient_id", "positive", "split"]


def make_splits(
    examples: Sequence[Example], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, str]:
    """image id -> ``train`` | ``val`` | ``test``, stratified by patient label, no patient in two splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers (train, val, test), got {fractions}")
    patients: dict[str, bool] = {}
    for example in examples:
        patients[example.patient_id] = patients.get(example.patient_id, False) or example.positive
    total = float(sum(fractions))
    rng = np.random.default_rng([seed, 7])
    assignment: dict[str, str] = {}
    for label in (False, True):
        group = sorted(p for p, positive in patients.items() if positive is label)
        order = [group[i] for i in rng.permutation(len(group))]
        n_val = int(round(len(order) * fractions[1] / total))
        n_test = int(round(len(order) * fractions[2] / total))
        n_train = max(len(order) - n_val - n_test, 0)
        for index, patient in enumerate(order):
            assignment[patient] = "train" if index < n_train else "val" if index < n_train + n_val else "test"
    return {example.image_id: assignment[example.patient_id] for example in examples}


def split_counts(examples: Sequence[Example], assignment: dict[str, str]) -> dict[str, tuple[int, int]]:
    """split -> (images, positives)."""
    images, positives = Counter(), Counter()
    for example in examples:
        split = assignment[example.image_id]
        images[split] += 1
        positives[split] += example.positive
    return {name: (images[name], positives[name]) for name in SPLIT_NAMES}


def write_splits(path: Path | str, examples: Sequence[Example], assignment: dict[str, str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SPLIT_COLUMNS)
        for example in examples:
            writer.writerow([example.image_id, example.patient_id, int(example.positive), assignment[example.image_id]])
    return target


def read_splits(path: Path | str, examples: Sequence[Example]) -> dict[str, str]:
    """The assignment in a split file; it must name every example and no other image."""
    source = Path(path)
    if not source.is_file():
        raise DatasetError(f"{source}: split file not found")
    known = {example.image_id: example for example in examples}
    assignment: dict[str, str] = {}
    patient_split: dict[str, tuple[str, int]] = {}
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("image_id", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{source}, row 1: missing column(s) {', '.join(missing)}")
        for number, row in enumerate(reader, start=2):
            image_id, split = (row["image_id"] or "").strip(), (row["split"] or "").strip()
            if split not in SPLIT_NAMES:
                raise DatasetError(f"{source}, row {number}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
            if image_id not in known:
                raise DatasetError(f"{source}, row {number}: image {image_id!r} is not in the data set")
            patient = known[image_id].patient_id
            if patient in patient_split and patient_split[patient][0] != split:
                raise DatasetError(
                    f"{source}, row {number}: patient {patient} is in {split} here and in "
                    f"{patient_split[patient][0]} in row {patient_split[patient][1]}"
                )
            patient_split.setdefault(patient, (split, number))
            assignment[image_id] = split
    absent = [image_id for image_id in known if image_id not in assignment]
    if absent:
        raise DatasetError(
            f"{source}: {len(absent)} image(s) of the data set are in no split, e.g. {absent[0]} "
            "(delete the split file to make a new one)"
        )
    return assignment
