"""Training data sets: the SIIM-ACR Pneumothorax layout and the ChestX-ray14 layout.

A reader turns a directory into a :class:`DatasetIndex`: one :class:`Example` per labelled image
(its file, patient, label and, for SIIM-ACR, the run-length encoded masks), plus what could not be
used. Nothing is silently ignored:

- bad input (a missing file, an RLE that runs past the image, a row without an image id, a header
  that is not DICOM) stops the reader with a :class:`DatasetError` naming the file and the CSV row,
  or, with ``skip_bad=True``, leaves the image out and records a :class:`Problem`;
- a CSV without the expected columns always stops (there is nothing to skip to);
- images on disk without any CSV row are listed in ``unlabelled`` and reported, not trained on.

Pixel data is decoded later, when the cached resized copy is built (:mod:`training.cache`); a
DICOM whose pixel data will not decode is reported there the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from training.archive import read_archive
from training.dataset_index import DatasetError, DatasetIndex, DatasetKind, Example, Problem
from training.rle import EMPTY_RLE, rle_decode
from training.synthetic import SIIM_CSV_NAME, SYNTHETIC_PATIENT_NAME

__all__ = [
    "CXR14_LABEL",
    "DatasetError",
    "DatasetIndex",
    "Example",
    "Problem",
    "find_cxr14_csv",
    "merge_datasets",
    "read_cxr14",
    "read_dataset",
    "read_siim",
]

CXR14_LABEL = "Pneumothorax"
CXR14_CSV_GLOB = "Data_Entry_2017*.csv"
SIIM_COLUMNS = ("ImageId", "EncodedPixels")
CXR14_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")

def _fail_or_skip(problems: list[Problem], skip_bad: bool, file: Path, row: int | None, message: str) -> None:
    problem = Problem(file, row, message)
    if not skip_bad:
        raise DatasetError(f"{problem} (use --skip-bad to leave such images out and report them)")
    problems.append(problem)


def _not_utf8(path: Path) -> DatasetError:
    """The error for a label file that is not UTF-8, naming the first line that is not."""
    line = "?"
    with path.open("rb") as raw:
        for number, data in enumerate(raw, start=1):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = f"{number}, byte {exc.start + 1}"
                break
    return DatasetError(
        f"{path}, line {line}: not UTF-8 text (saved in another encoding?): "
        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _open_csv(path: Path, required: Iterable[str]) -> tuple[list[str], Iterable[tuple[int, list[str]]]]:
    """The stripped header and an iterator of (row number, cells); stops when a column is missing."""
    if not path.is_file():
        raise DatasetError(f"{path}: label file not found")
    handle = path.open(newline="", encoding="utf-8-sig")
    reader = csv.reader(handle, skipinitialspace=True)
    try:
        header = [cell.strip() for cell in next(reader)]
    except StopIteration:
        handle.close()
        raise DatasetError(f"{path}: empty file; expected a header with columns {', '.join(required)}") from None
    except UnicodeDecodeError:
        handle.close()
        raise _not_utf8(path) from None
    missing = [column for column in required if column not in header]
    if missing:
        handle.close()
        raise DatasetError(
            f"{path}, row 1: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'nothing'}"
        )

    def rows() -> Iterable[tuple[int, list[str]]]:
        with handle:
            try:
                for number, cells in enumerate(reader, start=2):
                    if cells and any(cell.strip() for cell in cells):
                        yield number, cells
            except UnicodeDecodeError:
                raise _not_utf8(path) from None

    return header, rows()


def _files_by_stem(root: Path, pattern: str, skip: Path | None = None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(root.rglob(pattern)):
        if skip is not None and skip in path.parents:
            continue
        if path.stem in found:
            raise DatasetError(f"{path}: same image id as {found[path.stem]}; image ids must be unique")
        found[path.stem] = path
    return found


def read_siim(root: Path | str, rle_csv: Path | str | None = None, *, skip_bad: bool = False) -> DatasetIndex:
    """Read a SIIM-ACR Pneumothorax directory: DICOM files anywhere below ``root`` named ``<SOP UID>.dcm``
    (the competition's ``<study>/<series>/<sop>.dcm``) and ``train-rle.csv`` (``ImageId, EncodedPixels``).

    Several rows for one image are OR'ed; ``-1`` is an image without pneumothorax. Each image's
    header is read (not its pixels) for its size, to check every RLE against it, and for the
    patient, to keep a patient's images in one split.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"{base}: data directory not found")
    label_file = Path(rle_csv) if rle_csv is not None else base / SIIM_CSV_NAME
    header, rows = _open_csv(label_file, SIIM_COLUMNS)
    id_column, rle_column = header.index("ImageId"), header.index("EncodedPixels")
    files = _files_by_stem(base, "*.dcm")

    problems: list[Problem] = []
    grouped: dict[str, list[tuple[int, str]]] = {}
    for number, cells in rows:
        image_id = cells[id_column].strip() if len(cells) > id_column else ""
        rle = cells[rle_column].strip() if len(cells) > rle_column else ""
        if not image_id:
            _fail_or_skip(problems, skip_bad, label_file, number, "no ImageId")
            continue
        if not rle:
            _fail_or_skip(problems, skip_bad, label_file, number, f"ImageId {image_id}: empty EncodedPixels (use -1)")
            continue
        grouped.setdefault(image_id, []).append((number, rle))

    examples: list[Example] = []
    bad_ids: set[str] = set()
    for image_id, entries in grouped.items():
        first_row = entries[0][0]
        path = files.get(image_id)
        if path is None:
            _fail_or_skip(
                problems, skip_bad, label_file, first_row, f"ImageId {image_id}: no file {image_id}.dcm below {base}"
            )
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            height, width = int(ds.Rows), int(ds.Columns)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            _fail_or_skip(problems, skip_bad, path, first_row, f"not a readable DICOM image: {exc}")
            bad_ids.add(image_id)
            continue
        rles = tuple(rle for _, rle in entries if rle != EMPTY_RLE)
        error = None
        for number, rle in entries:
            try:
                rle_decode(rle, width=width, height=height)
            except ValueError as exc:
                error = (number, str(exc).removeprefix("rle_decode: "))
                break
        if error is not None:
            _fail_or_skip(problems, skip_bad, label_file, error[0], f"ImageId {image_id}: {error[1]}")
            continue
        patient = str(ds.get("PatientID", "") or "").strip() or image_id
        examples.append(
            Example(
                image_id=image_id,
                path=path,
                patient_id=patient,
                positive=bool(rles),
                rles=rles,
                rows=tuple(number for number, _ in entries),
                height=height,
                width=width,
                synthetic=str(ds.get("PatientName", "")) == SYNTHETIC_PATIENT_NAME,
            )
        )
    unlabelled = [path for stem, path in files.items() if stem not in grouped]
    return DatasetIndex("siim", base, label_file, examples, problems, unlabelled)


def find_cxr14_csv(root: Path) -> Path:
    found = sorted(root.glob(CXR14_CSV_GLOB))
    if not found:
        raise DatasetError(f"{root}: no {CXR14_CSV_GLOB} (ChestX-ray14's label file); give it with --labels")
    return found[-1]


def read_cxr14(root: Path | str, labels_csv: Path | str | None = None, *, skip_bad: bool = False) -> DatasetIndex:
    """Read a ChestX-ray14 directory: PNG files anywhere below ``root`` (``images_*/images/*.png``) and
    ``Data_Entry_2017*.csv`` (``Image Index``, ``Finding Labels`` separated by ``|``, ``Patient ID``).

    An image is positive when ``Pneumothorax`` is among its finding labels. There are no masks: the
    set trains classifiers only.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"{base}: data directory not found")
    label_file = Path(labels_csv) if labels_csv is not None else find_cxr14_csv(base)
    header, rows = _open_csv(label_file, CXR14_COLUMNS)
    name_column, label_column, patient_column = (header.index(c) for c in CXR14_COLUMNS)
    files = {path.name: path for path in sorted(base.rglob("*.png"))}

    problems: list[Problem] = []
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, cells in rows:
        if len(cells) <= max(name_column, label_column, patient_column):
            _fail_or_skip(problems, skip_bad, label_file, number, f"only {len(cells)} column(s)")
            continue
        name, findings, patient = (cells[i].strip() for i in (name_column, label_column, patient_column))
        if not name:
            _fail_or_skip(problems, skip_bad, label_file, number, "no Image Index")
            continue
        if name in seen:
            _fail_or_skip(problems, skip_bad, label_file, number, f"{name} already labelled in row {seen[name]}")
            continue
        seen[name] = number
        path = files.get(name)
        if path is None:
            _fail_or_skip(problems, skip_bad, label_file, number, f"no file {name} below {base}")
            continue
        labels = {label.strip() for label in findings.split("|")}
        examples.append(
            Example(
                image_id=Path(name).stem,
                path=path,
                patient_id=patient or Path(name).stem,
                positive=CXR14_LABEL in labels,
                rows=(number,),
            )
        )
    unlabelled = [path for name, path in files.items() if name not in seen]
    return DatasetIndex("cxr14", base, label_file, examples, problems, unlabelled)


def merge_datasets(indexes: list[DatasetIndex]) -> DatasetIndex:
    """One index of several data sets, to train on their union (split by patient across all of them).

    Image ids are SOP Instance UIDs (SIIM-ACR, archive) or file stems (ChestX-ray14): an id found
    in two sets is the same image, so it is kept once, with the label of the later set (pass the
    radiologists' feedback last to let it correct an older label); the earlier copy is reported as
    left out. Patients are grouped by their Patient ID across the sets, so a patient whose images
    are in two sets stays in one split.
    """
    if not indexes:
        raise ValueError("merge_datasets needs at least one data set")
    if len(indexes) == 1:
        return indexes[0]
    chosen: dict[str, tuple[Example, DatasetIndex]] = {}
    problems: list[Problem] = []
    for index in indexes:
        problems.extend(index.problems)
        for example in index.examples:
            earlier = chosen.get(example.image_id)
            if earlier is not None:
                problems.append(
                    Problem(earlier[0].path, None, f"image {example.image_id} is also in {index.root}; its label there is used")
                )
            chosen[example.image_id] = (example, index)
    return DatasetIndex(
        "merged",
        indexes[0].root,
        indexes[0].label_file,
        [example for example, _ in chosen.values()],
        problems,
        [path for index in indexes for path in index.unlabelled],
        list(indexes),
    )


def detect_kind(root: Path) -> DatasetKind:
    """``archive`` when ``root`` is a Pleura storage directory (it holds the ledger), ``siim`` when it
    holds train-rle.csv or DICOM files, ``cxr14`` when it holds Data_Entry_2017*.csv."""
    if (root / "ledger.sqlite").is_file():
        return "archive"
    if (root / SIIM_CSV_NAME).is_file():
        return "siim"
    if any(root.glob(CXR14_CSV_GLOB)):
        return "cxr14"
    if next(root.rglob("*.dcm"), None) is not None:
        return "siim"
    raise DatasetError(
        f"{root}: neither a SIIM-ACR layout ({SIIM_CSV_NAME} + DICOM files) nor a ChestX-ray14 layout "
        f"({CXR14_CSV_GLOB} + PNG files); give --format and the label file"
    )


def read_dataset(
    root: Path | str,
    labels: Path | str | None = None,
    *,
    kind: DatasetKind | None = None,
    skip_bad: bool = False,
) -> DatasetIndex:
    """Read ``root`` as the layout ``kind`` (detected when None); ``labels`` overrides the label file."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"{base}: data directory not found")
    chosen = kind
    if chosen is None and labels is not None:
        name = Path(labels).name
        chosen = "siim" if "rle" in name.lower() else "cxr14" if name.startswith("Data_Entry") else None
    chosen = chosen or detect_kind(base)
    if chosen == "archive":
        return read_archive(base, skip_bad=skip_bad)
    if chosen == "siim":
        return read_siim(base, labels, skip_bad=skip_bad)
    return read_cxr14(base, labels, skip_bad=skip_bad)
