"""`pleura evaluate`, `tune` and `compare`: metrics against independent computations, the SIIM-ACR
leaderboard metric on hand-made cases, the predictions file, the self-contained report, thresholds
written into a bundle that the worker loads, and one comparison row per preset.

Small throughout: a synthetic set of 20 images of 256 px with the demo bundle, or the 64 px set
with tiny networks.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from contract.bundle import Thresholds, load_bundle, write_manifest
from contract.networks import load_models
from contract.preprocess import decode_radiograph
from pleura.cli import app
from training.datasets import read_dataset, read_siim
from training.evaluate import held_out_examples
from training.metrics import dice_from_counts, leaderboard_dice, leaderboard_weights, resize_nearest
from training.rle import rle_decode
from training.splits import make_splits, write_splits
from training.synthetic import write_siim_dataset
from worker.inference.predict import predict_images

torch.set_num_threads(min(2, torch.get_num_threads()))
runner = CliRunner()


# --- the leaderboard metric, by hand --------------------------------------------------------------


def test_leaderboard_dice_on_hand_made_cases():
    empty, one = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    one[0, 0] = True
    assert leaderboard_dice(empty, empty) == 1.0  # nothing to find, nothing found
    assert leaderboard_dice(empty, one) == 0.0  # missed
    assert leaderboard_dice(one, empty) == 0.0  # false alarm
    truth, predicted = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    truth[0, 0:2] = True
    predicted[0, 1:3] = True
    assert leaderboard_dice(predicted, truth) == pytest.approx(0.5)  # 2*1/(2+2); 1024/4 is whole
    # 3x3 -> 1024x1024: the source rows and columns become 341, 342, 341 pixels. Truth = the top left
    # pixel (341*341), prediction = the top left two (341*(341+342)), overlap = the truth:
    # Dice = 2*341^2 / (341^2 + 341*683) = 682/1024, not the 2/3 of the 3x3 grid.
    truth, predicted = np.zeros((3, 3), bool), np.zeros((3, 3), bool)
    truth[0, 0] = True
    predicted[0, 0:2] = True
    assert leaderboard_dice(predicted, truth) == pytest.approx(682 / 1024)
    np.testing.assert_allclose(dice_from_counts([0, 1, 0], [0, 2, 3], [0, 2, 0]), [1.0, 0.5, 0.0])


@pytest.mark.parametrize("shape", [(3, 5), (64, 64), (700, 1300), (2048, 1536)])
def test_nearest_resize_is_pils_and_the_counts_are_exact(shape):
    rng = np.random.default_rng(1)
    mask = rng.random(shape) < 0.3
    resized = resize_nearest(mask)
    pil = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((1024, 1024), Image.Resampling.NEAREST)) > 0
    np.testing.assert_array_equal(resized, pil)
    rows, columns = leaderboard_weights(shape)
    assert rows @ mask @ columns == resized.sum()


# --- evaluate: the demo bundle on a small synthetic set -----------------------------------------


@pytest.fixture(scope="module")
def evaluation_set(tmp_path_factory) -> dict:
    """20 synthetic images of 256 px (the demo bundle's kind of data) and a split with 8 test images."""
    root = tmp_path_factory.mktemp("eval")
    data = write_siim_dataset(root / "data", 20, size=256, seed=5)
    index = read_siim(data)
    split_file = write_splits(root / "splits.csv", index.examples, make_splits(index.examples, (0.2, 0.4, 0.4)))
    return {"root": root, "data": data, "index": index, "split_file": split_file}


@pytest.fixture(scope="module")
def evaluated(evaluation_set: dict, demo_bundle: Path) -> dict:
    """`pleura evaluate` run once; the tests read what it wrote."""
    out = evaluation_set["root"] / "report"
    predictions = evaluation_set["root"] / "predictions.csv"
    result = runner.invoke(app, [
        "evaluate", "--model", str(demo_bundle), "--data", str(evaluation_set["data"]),
        "--split-file", str(evaluation_set["split_file"]), "--out", str(out), "--predictions", str(predictions),
        "--device", "cpu", "--cases", "1",
    ])
    assert result.exit_code == 0, result.output
    return {"out": out, "predictions": predictions, "output": result.output,
            "metrics": json.loads((out / "metrics.json").read_text()), **evaluation_set}


def _worker_findings(bundle_dir: Path, examples) -> list:
    """The worker's own decisions (load_models + decode_radiograph + predict_images) for the examples."""
    bundle = load_bundle(bundle_dir)
    datasets = [pydicom.dcmread(example.path) for example in examples]
    images = [decode_radiograph(ds, bundle.manifest.preprocessing) for ds in datasets]
    return predict_images(load_models(bundle, "cpu"), images, datasets)


def test_evaluate_measures_what_the_worker_decides(evaluated: dict, demo_bundle: Path):
    from monai.metrics import compute_dice
    from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

    index, metrics = evaluated["index"], evaluated["metrics"]
    test_ids = {row["image_id"] for row in csv.DictReader(evaluated["split_file"].open()) if row["split"] == "test"}
    examples = [e for e in index.examples if e.image_id in test_ids]
    assert metrics["images"] == len(examples) == 8 and metrics["split"]["name"] == "test"
    findings = _worker_findings(demo_bundle, examples)
    labels = np.array([e.positive for e in examples])
    probabilities = np.array([f.probability for f in findings])
    flagged = np.array([f.flagged for f in findings])
    threshold = metrics["thresholds"]["probability"]

    with (evaluated["out"] / "per_image.csv").open() as handle:
        rows = {row["image_id"]: row for row in csv.DictReader(handle)}
    for example, finding in zip(examples, findings):
        row = rows[example.image_id]
        assert float(row["probability"]) == pytest.approx(finding.probability, abs=1e-5)
        assert int(row["flagged"]) == finding.flagged and int(row["area_px"]) == finding.area_px

    classification, decision = metrics["classification"], metrics["decision"]
    assert classification["auc"] == pytest.approx(roc_auc_score(labels, probabilities))
    low, high = classification["auc_ci95"]
    assert 0.0 <= low <= classification["auc"] <= high <= 1.0
    assert classification["accuracy"] == pytest.approx(accuracy_score(labels, probabilities >= threshold))
    assert classification["sensitivity"] == pytest.approx(recall_score(labels, probabilities >= threshold))
    assert decision["sensitivity"] == pytest.approx(recall_score(labels, flagged))
    assert decision["specificity"] == pytest.approx(recall_score(~labels, ~flagged))
    if flagged.any():
        assert decision["f1"] == pytest.approx(f1_score(labels, flagged))
    assert decision["confusion"] == {"tp": int((flagged & labels).sum()), "fp": int((flagged & ~labels).sum()),
                                     "tn": int((~flagged & ~labels).sum()), "fn": int((~flagged & labels).sum())}

    # Leaderboard metric: the decision's mask (empty when not flagged) against the truth, at 1024 x 1024.
    per_image = []
    for example, finding in zip(examples, findings):
        predicted = resize_nearest(finding.mask if finding.flagged else np.zeros_like(finding.mask))
        truth = resize_nearest(example.mask())
        both = predicted.sum() + truth.sum()
        per_image.append(1.0 if both == 0 else 2.0 * (predicted & truth).sum() / both)
    assert decision["leaderboard"] == pytest.approx(np.mean(per_image))
    # U-Net Dice on positives, source grid (MONAI).
    dice = [
        float(compute_dice(torch.from_numpy(f.mask)[None, None].float(), torch.from_numpy(e.mask())[None, None].float(),
                           include_background=True, ignore_empty=False))
        for e, f in zip(examples, findings) if e.positive
    ]
    assert metrics["segmentation"]["dice"] == pytest.approx(np.mean(dice))
    assert metrics["resources"]["seconds_per_image"] > 0
    assert set(metrics["resources"]["networks"]) == {"classifier", "segmenter"}
    assert all(profile["peak_mb"] > 0 for profile in metrics["resources"]["networks"].values())
    assert "stratified bootstrap" in metrics["methods"]["auc_ci"]


def test_predictions_file_is_the_siim_submission_format(evaluated: dict, demo_bundle: Path):
    examples = {e.image_id: e for e in evaluated["index"].examples}
    with evaluated["predictions"].open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["ImageId", "EncodedPixels"]
        rows = list(reader)
    assert len(rows) == 8
    findings = _worker_findings(demo_bundle, [examples[image_id] for image_id, _ in rows])
    for (image_id, encoded), finding in zip(rows, findings):
        example = examples[image_id]
        decoded = rle_decode(encoded, width=example.width, height=example.height)
        expected = finding.mask if finding.flagged else np.zeros_like(finding.mask)
        np.testing.assert_array_equal(decoded, expected)
        assert (encoded == "-1") == (not expected.any())


def test_report_is_self_contained_with_every_section(evaluated: dict):
    out = evaluated["out"]
    page = (out / "report.html").read_text()
    for section in ("summary", "classification", "segmentation", "decision", "speed", "training", "cases", "methods"):
        assert f"id='{section}'" in page
    assert "SYNTHETIC DEMO MODEL" in page
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)
    sources = re.findall(r"""src=['"]([^'"]+)""", page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert "<link" not in page and "<script" not in page
    for name in ("roc", "precision_recall", "confusion", "dice_histogram"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "plots").glob("case_*.png"))) >= 3  # best, worst, borderline
    assert "stratified bootstrap" in page


def test_the_held_out_split_comes_from_the_bundle_or_the_whole_set_with_a_warning(
    evaluation_set: dict, tiny_base_bundle: Path, tmp_path: Path
):
    index = evaluation_set["index"]
    held = held_out_examples(index, load_bundle(tiny_base_bundle), "test")  # no split file recorded
    assert held.split == "all" and len(held.examples) == len(index.examples) and "WHOLE data set" in held.note
    copy = shutil.copytree(tiny_base_bundle, tmp_path / "bundle")
    manifest = load_bundle(copy).manifest
    manifest.segmenter.training["split_file"] = str(evaluation_set["split_file"])
    write_manifest(copy, manifest)
    held = held_out_examples(index, load_bundle(copy), "val")
    assert held.split == "val" and held.split_file == evaluation_set["split_file"] and "recorded" in held.note
    manifest.segmenter.training["split_file"] = str(tmp_path / "gone.csv")
    write_manifest(copy, manifest)
    held = held_out_examples(index, load_bundle(copy), "test")
    assert held.split == "all" and "gone.csv" in held.note
    in_run = shutil.copytree(tiny_base_bundle, tmp_path / "run" / "bundle")  # a run folder: OUT/splits.csv, OUT/bundle
    shutil.copyfile(evaluation_set["split_file"], tmp_path / "run" / "splits.csv")
    held = held_out_examples(index, load_bundle(in_run), "test")
    assert held.split == "test" and held.split_file == tmp_path / "run" / "splits.csv" and len(held.examples) == 8

    result = runner.invoke(app, ["evaluate", "--model", str(copy), "--data", str(evaluation_set["data"]),
                                 "--out", str(tmp_path / "whole"), "--device", "cpu", "--cases", "0"])
    assert result.exit_code == 0, result.output
    assert "WHOLE data set" in result.output
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["images"] == 20


# --- tune ----------------------------------------------------------------------------------------


def test_tune_meets_the_sensitivity_target_and_the_worker_loads_the_bundle(
    evaluation_set: dict, demo_bundle: Path, tmp_path: Path
):
    bundle_dir = shutil.copytree(demo_bundle, tmp_path / "bundle")
    command = [
        "tune", "--model", str(bundle_dir), "--data", str(evaluation_set["data"]),
        "--split-file", str(evaluation_set["split_file"]), "--min-sensitivity", "0.95", "--device", "cpu",
    ]
    refused = runner.invoke(app, command)  # `pleura demo-model` would rebuild the demo with its own thresholds
    assert refused.exit_code == 2 and "demo bundle" in refused.output and "--out" in refused.output
    before = load_bundle(bundle_dir).manifest
    before.name = "site-model"
    write_manifest(bundle_dir, before)
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    tuned = load_bundle(bundle_dir).manifest
    record = tuned.tuning
    assert record["target_kind"] == "min_sensitivity" and record["min_sensitivity"] == 0.95
    assert record["split"] == "val" and record["split_file"] == str(evaluation_set["split_file"])
    assert record["previous_thresholds"] == before.thresholds.model_dump()
    assert record["thresholds"] == tuned.thresholds.model_dump()
    assert tuned.version == before.version and tuned.metrics["decision_val_sensitivity"] >= 0.95

    # On the validation images, the worker's own decisions with the tuned bundle meet the target.
    val_ids = {row["image_id"] for row in csv.DictReader(evaluation_set["split_file"].open()) if row["split"] == "val"}
    examples = [e for e in evaluation_set["index"].examples if e.image_id in val_ids]
    findings = _worker_findings(bundle_dir, examples)
    positives = [f.flagged for e, f in zip(examples, findings) if e.positive]
    negatives = [not f.flagged for e, f in zip(examples, findings) if not e.positive]
    assert np.mean(positives) >= 0.95
    assert np.mean(negatives) == pytest.approx(record["validation"]["specificity"], abs=1e-4)

    from worker.analysis import StudyAnalyser

    analyser = StudyAnalyser.from_bundle_dir(tmp_path / "storage", bundle_dir, device="cpu")
    assert analyser.models.thresholds == tuned.thresholds


def test_tune_for_the_leaderboard_writes_a_copy_and_leaves_the_bundle(
    evaluation_set: dict, demo_bundle: Path, tmp_path: Path
):
    from training.evaluate import collect_statistics, summarise
    from training.tune import Grid, Target, sweep, tune

    bundle = load_bundle(demo_bundle)
    original = (demo_bundle / "manifest.json").read_text()
    result = runner.invoke(app, [
        "tune", "--model", str(demo_bundle), "--data", str(evaluation_set["data"]),
        "--split-file", str(evaluation_set["split_file"]), "--target", "leaderboard", "--out", str(tmp_path / "tuned"),
        "--mask-thresholds", "0.3,0.5,0.7", "--min-areas", "0,100,262,1000", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert (demo_bundle / "manifest.json").read_text() == original
    tuned = load_bundle(tmp_path / "tuned")
    assert tuned.manifest.version.startswith(bundle.manifest.version + "-tuned.")
    assert tuned.manifest.tuning["target_kind"] == "leaderboard"

    # The chosen triplet is the best of the grid: score every triplet through summarise (the evaluation path).
    val = held_out_examples(evaluation_set["index"], bundle, "val", evaluation_set["split_file"]).examples
    stats = collect_statistics(load_models(bundle, "cpu"), val, [0.3, 0.5, 0.7], with_masks=True, profile_images=0)
    grid = Grid(tuple(tuned.manifest.tuning["grid"]["probability"]), (0.3, 0.5, 0.7), (0, 100, 262, 1000))
    scores = [
        summarise(stats, Thresholds(probability=p, mask=m, min_area_px=a))["decision"]["leaderboard"]
        for m in grid.mask_thresholds for p in grid.probabilities[::4] for a in grid.min_areas
    ]
    best = tuned.manifest.tuning["validation"]["leaderboard"]
    assert all(score <= best + 1e-4 for score in scores)
    assert best == pytest.approx(np.nanmax(sweep(stats, grid).leaderboard), abs=1e-4)
    assert summarise(stats, tuned.manifest.thresholds)["decision"]["leaderboard"] == pytest.approx(best, abs=1e-4)
    assert tune(stats, Target("leaderboard"), grid).thresholds == tuned.manifest.thresholds

    refused = runner.invoke(app, ["tune", "--model", str(demo_bundle), "--data", str(evaluation_set["data"]),
                                  "--out", str(tmp_path / "other"), "--device", "cpu"])  # no split: no val images
    assert refused.exit_code == 2 and "--split-file" in refused.output and not (tmp_path / "other").exists()


# --- compare -------------------------------------------------------------------------------------


def test_compare_writes_one_row_per_preset(synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path):
    out = tmp_path / "compare"
    result = runner.invoke(app, [
        "compare", "--preset", "cls-cbr-baseline", "--preset", "cls-resnet18", "--data", str(synthetic_siim),
        "--base", str(tiny_base_bundle), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "1",
        "--batch-size", "4", "--input-size", "64", "--split", "0.5,0.2,0.3", "--device", "cpu",
        "--cache-dir", str(tmp_path / "cache"), "--cases", "1",
    ])
    assert result.exit_code == 0, result.output
    with (out / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["preset"] for row in rows] == ["cls-cbr-baseline", "cls-resnet18"]
    assert rows[0]["trained"] == "classifier: cbr" and rows[1]["trained"] == "classifier: resnet18"
    assert rows[0]["images"] == rows[1]["images"]  # one split for both
    assert all(float(row["ms_per_image"]) > 0 and float(row["classifier_peak_mb"]) > 0 for row in rows)
    table = (out / "compare.md").read_text()
    assert "| cls-cbr-baseline |" in table and "| cls-resnet18 |" in table
    assert all(row["synthetic_demo"] == "SYNTHETIC DEMO" for row in rows) and "not for clinical use" in table
    assert (out / "cls-resnet18" / "evaluation" / "report.html").is_file()
    # Training curves of the run that made the bundle are in its report.
    assert (out / "cls-cbr-baseline" / "evaluation" / "plots" / "training_curves.png").is_file()

    again = runner.invoke(app, [
        "compare", "--preset", "cls-cbr-baseline", "--evaluate-only", "--model", str(tiny_base_bundle),
        "--data", str(synthetic_siim), "--out", str(out), "--device", "cpu", "--cases", "0",
    ])
    assert again.exit_code == 0, again.output
    with (out / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["cls-cbr-baseline", "tiny-base 0"]
    assert rows[0]["images"] == rows[1]["images"]


def test_the_bootstrap_auc_is_scikit_learns_auc_on_each_resample():
    from sklearn.metrics import roc_auc_score

    from training.metrics import auc_confidence_interval

    rng = np.random.default_rng(3)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) + labels * 0.3, 1)  # ties, as real probabilities have
    low, high = auc_confidence_interval(labels, scores, resamples=300, seed=7)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    again = np.random.default_rng(7)  # the same draws, resample by resample
    reference = []
    for block in (250, 50):
        drawn_pos = again.choice(positives, (block, len(positives)))
        drawn_neg = again.choice(negatives, (block, len(negatives)))
        for row in range(block):
            drawn = np.r_[drawn_pos[row], drawn_neg[row]]
            reference.append(roc_auc_score(labels[drawn], scores[drawn]))
    assert (low, high) != (None, None) and low < roc_auc_score(labels, scores) < high
    assert np.percentile(reference, [2.5, 97.5]) == pytest.approx([low, high], abs=1e-12)
    assert auc_confidence_interval(np.ones(5, bool), np.arange(5.0)) is None


def test_a_data_set_without_masks_is_evaluated_and_tuned_on_its_labels(tiny_base_bundle: Path, tmp_path: Path):
    """ChestX-ray14 layout: the classifier and the decision are measured, the U-Net's Dice is not."""
    from training.synthetic import synthetic_chest_image

    root = tmp_path / "cxr14"
    (root / "images_001" / "images").mkdir(parents=True)
    rows = ["Image Index,Finding Labels,Patient ID"]
    for index in range(12):
        positive = index % 2 == 0
        pixels, _ = synthetic_chest_image(200 + index, positive, 64)
        Image.fromarray((pixels >> 4).astype(np.uint8)).save(root / "images_001" / "images" / f"{index:08d}_000.png")
        rows.append(f"{index:08d}_000.png,{'Pneumothorax' if positive else 'No Finding'},{index}")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    index = read_dataset(root)
    split_file = write_splits(tmp_path / "splits.csv", index.examples, make_splits(index.examples, (0.2, 0.4, 0.4)))
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_base_bundle), "--data", str(root), "--split-file",
                                 str(split_file), "--out", str(out), "--device", "cpu", "--cases", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["segmentation"]["available"] is False and metrics["decision"]["leaderboard"] is None
    assert metrics["classification"]["auc"] is not None
    page = (out / "report.html").read_text()
    assert "no masks" in page and not (out / "plots" / "dice_histogram.png").exists()

    bundle_dir = shutil.copytree(tiny_base_bundle, tmp_path / "bundle")
    command = ["tune", "--model", str(bundle_dir), "--data", str(root), "--split-file", str(split_file), "--device", "cpu"]
    assert "needs true masks" in runner.invoke(app, [*command, "--target", "leaderboard"]).output
    result = runner.invoke(app, [*command, "--min-sensitivity", "1"])
    assert result.exit_code == 0, result.output
    assert load_bundle(bundle_dir).manifest.tuning["validation"]["sensitivity"] == 1.0


def test_an_image_that_will_not_decode_stops_the_evaluation_naming_it(
    evaluation_set: dict, tiny_base_bundle: Path, tmp_path: Path
):
    data = shutil.copytree(evaluation_set["data"], tmp_path / "data")
    broken = sorted(data.rglob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:-5000])  # pixel data cut short
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_base_bundle), "--data", str(data),
                                 "--out", str(tmp_path / "out"), "--device", "cpu", "--cases", "0"])
    assert result.exit_code == 2
    assert "Data error" in result.output and broken.name in result.output and "cannot decode" in result.output


def test_cpu_peak_memory_sees_what_a_block_allocates():
    from training.evaluate import _PeakMemory

    with _PeakMemory(torch.device("cpu")) as memory:
        block = np.ones(160 * 2**20 // 8)  # 160 MiB, every page touched
        del block
    assert memory.resettable and 150 <= memory.peak_mb <= 400
    with _PeakMemory(torch.device("cpu")) as memory:
        pass
    assert memory.peak_mb < 50  # the high-water mark was reset, not the earlier peak


def test_evaluate_and_tune_print_their_results_as_json(evaluation_set: dict, demo_bundle: Path, tmp_path: Path) -> None:
    common = ["--model", str(demo_bundle), "--data", str(evaluation_set["data"]),
              "--split-file", str(evaluation_set["split_file"]), "--device", "cpu", "--json"]
    evaluated = runner.invoke(app, ["evaluate", *common, "--out", str(tmp_path / "report"), "--cases", "1"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)  # stdout holds the JSON alone; progress went to stderr
    assert report["metrics"] == json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["written"]["metrics"] == str(tmp_path / "report" / "metrics.json")

    tuned = runner.invoke(app, ["tune", *common, "--min-sensitivity", "0.5", "--out", str(tmp_path / "tuned")])
    assert tuned.exit_code == 0, tuned.output
    result = json.loads(tuned.stdout)
    assert result["bundle"] == str(tmp_path / "tuned")
    assert result["thresholds"] == load_bundle(tmp_path / "tuned").manifest.thresholds.model_dump(mode="json")
    assert result["metrics"]["decision"]["sensitivity"] >= 0.5
