"""Training data: the SIIM-ACR and ChestX-ray14 readers, bad input, patient-level splits, the resized cache."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from contract.bundle import Preprocessing
from contract.preprocess import apply_clahe, decode_radiograph, resize_to_input
from training.cache import build_cache, decode_example
from training.datasets import DatasetError, read_cxr14, read_dataset, read_siim
from training.rle import rle_decode
from training.splits import make_splits, read_splits, split_counts, write_splits
from training.synthetic import synthetic_chest_image

torch.set_num_threads(min(2, torch.get_num_threads()))


def _rows(csv_path: Path) -> list[list[str]]:
    with csv_path.open(newline="") as handle:
        return list(csv.reader(handle))


def _write_rows(csv_path: Path, rows: list[list[str]]) -> None:
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


@pytest.fixture
def siim_copy(synthetic_siim: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_siim, tmp_path / "data"))


def test_read_siim_ors_rows_and_reads_patients(synthetic_siim: Path):
    index = read_siim(synthetic_siim)
    assert index.kind == "siim" and index.has_masks
    assert len(index.examples) == 24 and index.positives == 12
    assert not index.problems and not index.unlabelled
    assert len({e.patient_id for e in index.examples}) == 12  # two images per synthetic patient
    rows = _rows(synthetic_siim / "train-rle.csv")[1:]
    for example in index.examples:
        assert example.path.stem == example.image_id and (example.height, example.width) == (64, 64)
        if example.positive:
            assert len(example.rles) == 2 and len(example.rows) == 2  # the mask was written as two rows
            union = rle_decode(example.rles[0], 64, 64) | rle_decode(example.rles[1], 64, 64)
            assert np.array_equal(example.mask(), union) and example.mask().any()
            # The rows are the generator's whole mask: decode the image's seed again.
            ds = pydicom.dcmread(example.path)
            assert ds.pixel_array[example.mask()].mean() < np.median(ds.pixel_array)
        else:
            assert example.rles == () and not example.mask().any()
    assert sum(len(e.rows) for e in index.examples) == len(rows)


def test_image_without_a_row_is_reported_not_dropped_silently(siim_copy: Path):
    rows = _rows(siim_copy / "train-rle.csv")
    dropped = rows[1][0]
    _write_rows(siim_copy / "train-rle.csv", [rows[0]] + [row for row in rows[1:] if row[0] != dropped])
    index = read_siim(siim_copy)
    assert [path.stem for path in index.unlabelled] == [dropped]
    assert dropped not in {e.image_id for e in index.examples}
    assert "1 without a row" in index.describe()


def test_missing_file_stops_naming_the_csv_row_or_is_skipped(siim_copy: Path):
    rows = _rows(siim_copy / "train-rle.csv")
    rows.insert(3, ["1.2.3.4.5", " -1"])
    _write_rows(siim_copy / "train-rle.csv", rows)
    with pytest.raises(DatasetError, match=r"train-rle\.csv, row 4: ImageId 1\.2\.3\.4\.5: no file 1\.2\.3\.4\.5\.dcm"):
        read_siim(siim_copy)
    index = read_siim(siim_copy, skip_bad=True)
    assert len(index.examples) == 24
    assert [(p.row, "1.2.3.4.5" in p.message) for p in index.problems] == [(4, True)]
    assert "row 4" in str(index.problems[0])


def test_rle_past_the_image_stops_naming_the_row(siim_copy: Path):
    rows = _rows(siim_copy / "train-rle.csv")
    rows[5][1] = " 4000 200"  # 64 x 64 = 4096 pixels
    _write_rows(siim_copy / "train-rle.csv", rows)
    with pytest.raises(DatasetError, match=r"row 6: ImageId .*beyond the 64x64 image"):
        read_siim(siim_copy)
    index = read_siim(siim_copy, skip_bad=True)
    assert len(index.examples) == 23 and index.problems[0].row == 6


def test_csv_without_the_columns_stops_naming_the_file(siim_copy: Path):
    rows = _rows(siim_copy / "train-rle.csv")
    rows[0] = ["ImageId", "Mask"]
    _write_rows(siim_copy / "train-rle.csv", rows)
    with pytest.raises(DatasetError, match=r"train-rle\.csv, row 1: missing column\(s\) EncodedPixels"):
        read_siim(siim_copy, skip_bad=True)  # nothing to skip to


def test_not_a_dicom_file_stops_naming_the_file(siim_copy: Path):
    victim = sorted(siim_copy.rglob("*.dcm"))[0]
    victim.write_bytes(b"not a DICOM file at all" * 10)
    with pytest.raises(DatasetError, match=rf"{victim.name}, row \d+: not a readable DICOM image"):
        read_siim(siim_copy)
    assert len(read_siim(siim_copy, skip_bad=True).examples) == 23


def test_undecodable_pixel_data_stops_the_cache_or_is_skipped(siim_copy: Path, tmp_path: Path):
    victim = sorted(siim_copy.rglob("*.dcm"))[1]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:100]  # truncated
    ds.save_as(victim)
    index = read_siim(siim_copy)  # headers are fine
    recipe = Preprocessing(input_size=32)
    with pytest.raises(DatasetError, match=rf"{victim.name}, row \d+: cannot decode the image"):
        build_cache(index.examples, recipe, with_masks=True, cache_root=tmp_path / "cache")
    cache = build_cache(index.examples, recipe, with_masks=True, cache_root=tmp_path / "cache", skip_bad=True)
    assert len(cache) == 23 and cache.images.shape == (23, 32, 32) and cache.masks.shape == (23, 32, 32)
    assert victim.stem not in cache.image_ids and cache.problems[0].file == victim


def test_cache_holds_the_shared_preprocessing_and_is_reused(synthetic_siim: Path, tmp_path: Path):
    index = read_siim(synthetic_siim)
    examples = index.examples[:6]
    recipe = Preprocessing(input_size=32, clahe=True)
    built = build_cache(examples, recipe, with_masks=True, cache_root=tmp_path)
    for slot, example in enumerate(examples):
        expected = resize_to_input(decode_radiograph(pydicom.dcmread(example.path), recipe), recipe)
        np.testing.assert_allclose(built.images[slot].astype(np.float32), expected, atol=1e-3)
        assert bool(built.masks[slot].any()) == example.positive
    assert built.labels.tolist() == [e.positive for e in examples]
    again = build_cache(examples, recipe, with_masks=True, cache_root=tmp_path)
    assert again.directory == built.directory
    other = build_cache(examples, recipe.model_copy(update={"clahe": False}), with_masks=True, cache_root=tmp_path)
    assert other.directory != built.directory


def test_splits_are_patient_level_stratified_and_repeatable(tmp_path: Path):
    from training.datasets import Example

    examples = [
        Example(f"img{i}", Path(f"img{i}.dcm"), f"p{i // 3}", positive=(i // 3) % 4 == 0) for i in range(120)
    ]  # 40 patients of 3 images, 10 positive patients
    assignment = make_splits(examples, (0.7, 0.15, 0.15), seed=3)
    assert assignment == make_splits(examples, (0.7, 0.15, 0.15), seed=3)
    assert assignment != make_splits(examples, (0.7, 0.15, 0.15), seed=4)
    by_patient: dict[str, set[str]] = {}
    for example in examples:
        by_patient.setdefault(example.patient_id, set()).add(assignment[example.image_id])
    assert all(len(splits) == 1 for splits in by_patient.values())
    counts = split_counts(examples, assignment)
    # per class: 10 positive patients -> 6 / 2 / 2, 30 negative -> 22 / 4 / 4
    assert counts == {"train": (84, 18), "val": (18, 6), "test": (18, 6)}

    path = write_splits(tmp_path / "splits.csv", examples, assignment)
    assert read_splits(path, examples) == assignment
    rows = _rows(path)
    rows[1][3] = "val" if rows[1][3] != "val" else "train"  # one image of a patient elsewhere
    _write_rows(path, rows)
    with pytest.raises(DatasetError, match="row 3: patient p0 is in"):
        read_splits(path, examples)
    with pytest.raises(DatasetError, match="are in no split"):
        write_splits(path, examples[:10], assignment)
        read_splits(path, examples)


def _write_cxr14(root: Path) -> Path:
    images = root / "images_001" / "images"
    images.mkdir(parents=True)
    rows = [["Image Index", "Finding Labels", "Follow-up #", "Patient ID"]]
    for index in range(8):
        name = f"{index:08d}_000.png"
        pixels, _ = synthetic_chest_image(index, index % 2 == 0, 64)
        Image.fromarray((pixels >> 4).astype(np.uint8)).save(images / name)
        labels = "Pneumothorax|Effusion" if index % 2 == 0 else ("No Finding" if index % 3 else "Atelectasis")
        rows.append([name, labels, "0", str(index // 2)])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(images / "unlisted.png")
    _write_rows(root / "Data_Entry_2017_v2020.csv", rows)
    return root


def test_read_chestxray14(tmp_path: Path):
    root = _write_cxr14(tmp_path / "cxr14")
    index = read_dataset(root)
    assert index.kind == "cxr14" and not index.has_masks
    assert len(index.examples) == 8 and index.positives == 4
    assert [p.name for p in index.unlabelled] == ["unlisted.png"]
    assert {e.patient_id for e in index.examples} == {"0", "1", "2", "3"}
    recipe = Preprocessing(input_size=32, clahe=True)
    image = decode_example(index.examples[0], recipe)
    plain = decode_example(index.examples[0], recipe.model_copy(update={"clahe": False}))
    assert image.shape == (64, 64) and 0 <= image.min() and image.max() <= 1
    np.testing.assert_allclose(image, apply_clahe(plain, recipe.clahe_clip_limit), atol=1e-6)


def test_chestxray14_bad_input(tmp_path: Path):
    root = _write_cxr14(tmp_path / "cxr14")
    label_file = root / "Data_Entry_2017_v2020.csv"
    rows = _rows(label_file)
    rows.append(["99999999_000.png", "Pneumothorax", "0", "9"])
    _write_rows(label_file, rows)
    with pytest.raises(DatasetError, match=r"Data_Entry_2017_v2020\.csv, row 10: no file 99999999_000\.png"):
        read_cxr14(root)
    assert len(read_cxr14(root, skip_bad=True).problems) == 1
    _write_rows(label_file, [["Image Index", "Labels"]] + rows[1:])
    with pytest.raises(DatasetError, match=r"row 1: missing column\(s\) Finding Labels, Patient ID"):
        read_cxr14(root)


def test_jpeg_baseline_layout_reads_like_the_real_set(tmp_path: Path):
    from training.synthetic import write_siim_dataset

    plain = read_siim(write_siim_dataset(tmp_path / "plain", 3, size=64, seed=5))
    jpeg = read_siim(write_siim_dataset(tmp_path / "jpeg", 3, size=64, seed=5, jpeg=True))
    assert [e.image_id for e in jpeg.examples] == [e.image_id for e in plain.examples]
    recipe = Preprocessing(input_size=32)
    for lossy, exact in zip(jpeg.examples, plain.examples):
        ds = pydicom.dcmread(lossy.path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit and ds.BitsStored == 8
        assert np.array_equal(lossy.mask(), exact.mask())
        difference = decode_example(lossy, recipe) - decode_example(exact, recipe)
        assert np.abs(difference).mean() < 0.02


def test_cli_dataset_check_reports_rows_and_undecodable_images(siim_copy: Path):
    from typer.testing import CliRunner

    from pleura.cli import app

    runner = CliRunner()
    rows = _rows(siim_copy / "train-rle.csv")
    rows.insert(2, ["1.2.3.4.5", " -1"])
    _write_rows(siim_copy / "train-rle.csv", rows)
    stopped = runner.invoke(app, ["dataset", "check", "--data", str(siim_copy)])
    assert stopped.exit_code == 2 and "train-rle.csv, row 3: ImageId 1.2.3.4.5: no file" in stopped.output

    victim = sorted(siim_copy.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:10]
    ds.save_as(victim)
    checked = runner.invoke(app, ["dataset", "check", "--data", str(siim_copy), "--skip-bad", "--decode"])
    assert checked.exit_code == 1, checked.output
    assert "skipped" in checked.output and "row 3" in checked.output
    assert f"cannot decode {victim}" in checked.output.replace("\n", "") and "1 image(s) will not decode" in checked.output
