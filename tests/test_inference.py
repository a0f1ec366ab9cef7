"""Model construction, bundle loading, prediction with its decision and areas, and image eligibility."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from contract.bundle import BundleError, Manifest, NetworkSpec, Preprocessing, Thresholds, load_bundle, write_manifest
from contract.decision import flag_decision, lesion_mask, source_lesion_mask
from contract.reasons import decision_reason, reason_threshold
from contract.networks import LoadedModels, build_network, load_models
from contract.preprocess import decode_radiograph, mask_to_source
from training.synthetic import synthetic_dicom
from worker.inference.predict import pixel_spacing_mm, predict_images
from worker.inference.select import ineligibility_reason

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_DENSENET = {"init_features": 8, "growth_rate": 4, "block_config": [1, 2, 2, 1]}
SMALL_UNET = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def pydicom_data(name: str) -> Path:
    from data_store import DataStore  # the import name of the pydicom-data package

    return Path(DataStore().get_path(name))


def test_build_network_shapes_for_both_architectures():
    recipe = Preprocessing(input_size=64, channels=1)
    classifier = build_network(NetworkSpec(architecture="densenet121", weights_file="c.pt", extra=SMALL_DENSENET), recipe)
    segmenter = build_network(
        NetworkSpec(architecture="unet", encoder="tu-resnet18", weights_file="s.pt", extra=SMALL_UNET), recipe
    )
    x = torch.rand(2, 1, 64, 64)
    classifier.eval()
    segmenter.eval()
    with torch.inference_mode():
        assert classifier(x).shape == (2, 1)
        assert segmenter(x).shape == (2, 1, 64, 64)
    assert classifier.features.conv0.out_channels == 8  # spec.extra reached the network

    three = Preprocessing(input_size=64, channels=3)
    default_unet = build_network(NetworkSpec(architecture="unet", weights_file="s.pt"), three)
    assert default_unet.encoder.conv1.in_channels == 3  # resnet34 is the default encoder
    assert len(default_unet.encoder.layer2) == 4  # resnet34's second stage has four blocks (resnet18: two)
    full = build_network(NetworkSpec(architecture="densenet121", weights_file="c.pt"), three)
    assert full.features.conv0.in_channels == 3 and full.features.conv0.out_channels == 64


def test_build_network_refuses_what_it_cannot_build():
    recipe = Preprocessing(input_size=64)
    with pytest.raises(BundleError, match="unknown architecture 'vit'"):
        build_network(NetworkSpec(architecture="vit", weights_file="x.pt"), recipe)
    with pytest.raises(BundleError, match="divisible"):
        build_network(NetworkSpec(architecture="unet", weights_file="s.pt"), Preprocessing(input_size=48))
    with pytest.raises(BundleError, match="in_channels"):
        build_network(NetworkSpec(architecture="densenet121", weights_file="c.pt", extra={"in_channels": 3}), recipe)
    with pytest.raises(BundleError, match="no_such_argument"):
        build_network(NetworkSpec(architecture="densenet121", weights_file="c.pt", extra={"no_such_argument": 1}), recipe)


def write_tiny_bundle(root: Path, thresholds: Thresholds | None = None) -> Path:
    """A bundle with small randomly initialised networks, as a trained bundle would be written."""
    manifest = Manifest(
        name="tiny-test",
        version="0.0.1",
        intended_use="unit tests",
        synthetic_demo=True,
        preprocessing=Preprocessing(input_size=64, channels=1),
        classifier=NetworkSpec(architecture="densenet121", weights_file="classifier.pt", extra=SMALL_DENSENET),
        segmenter=NetworkSpec(architecture="unet", encoder="tu-resnet18", weights_file="segmenter.pt", extra=SMALL_UNET),
        thresholds=thresholds or Thresholds(),
    )
    torch.manual_seed(0)
    for spec in (manifest.classifier, manifest.segmenter):
        root.mkdir(parents=True, exist_ok=True)
        torch.save(build_network(spec, manifest.preprocessing).state_dict(), root / spec.weights_file)
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> LoadedModels:
    return load_models(load_bundle(write_tiny_bundle(tmp_path_factory.mktemp("bundle"))), "cpu")


def with_thresholds(models: LoadedModels, **values) -> LoadedModels:
    manifest = models.manifest.model_copy(update={"thresholds": Thresholds(**values)})
    return dataclasses.replace(models, manifest=manifest)


def test_load_models_gives_eval_mode_networks_on_the_cpu(tiny_models):
    assert tiny_models.device == torch.device("cpu")
    assert not tiny_models.classifier.training and not tiny_models.segmenter.training
    assert tiny_models.manifest.name == "tiny-test"
    assert all(p.device.type == "cpu" for p in tiny_models.segmenter.parameters())


def test_load_models_errors_name_the_problem(tmp_path):
    root = write_tiny_bundle(tmp_path / "bundle")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load_models(load_bundle(root), "cuda")
    with pytest.raises(ValueError, match="tpu"):
        load_models(load_bundle(root), "tpu")
    # Weights of another shape than the manifest describes.
    other = NetworkSpec(architecture="densenet121", weights_file="classifier.pt", extra={"init_features": 4, "growth_rate": 2})
    torch.save(build_network(other, Preprocessing(input_size=64)).state_dict(), root / "classifier.pt")
    with pytest.raises(BundleError, match="classifier.pt"):
        load_models(load_bundle(root), "cpu")
    (root / "segmenter.pt").write_bytes(b"not a torch file")
    (root / "classifier.pt").unlink()
    with pytest.raises(BundleError, match="classifier.pt"):
        load_bundle(root)


def _source(rows: int, columns: int, **attributes) -> tuple[np.ndarray, Dataset]:
    ds = Dataset()
    ds.Rows, ds.Columns = rows, columns
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    image = np.random.default_rng(rows * columns).random((rows, columns)).astype(np.float32)
    return image, ds


def test_predict_images_one_finding_per_image_in_the_source_grid(tiny_models):
    synthetic, _ = synthetic_dicom(21, True, size=96)
    recipe = tiny_models.manifest.preprocessing
    images = [decode_radiograph(synthetic, recipe)]
    sources = [synthetic]
    for image, ds in (
        _source(70, 110, ImagerPixelSpacing=[0.2, 0.25]),
        _source(50, 40),  # no spacing at all
        _source(64, 64, PixelSpacing=[0, 0]),  # present but zero, as in RG1
    ):
        images.append(image)
        sources.append(ds)

    everything = with_thresholds(tiny_models, probability=0.0, mask=0.0, min_area_px=0)
    findings = predict_images(everything, images, sources, batch_size=3)
    assert len(findings) == 4
    for finding, image in zip(findings, images):
        assert finding.mask.shape == image.shape and finding.mask.dtype == bool
        assert finding.area_px == int(finding.mask.sum()) == image.size  # mask threshold 0: every pixel
        assert 0.0 <= finding.probability <= 1.0 and finding.threshold == 0.0
        assert finding.flagged
    spacing = float(synthetic.ImagerPixelSpacing[0])
    assert spacing == pytest.approx(430 / 96, rel=1e-5)
    assert findings[0].area_cm2 == pytest.approx(96 * 96 * spacing * spacing / 100)
    assert findings[1].area_cm2 == pytest.approx(70 * 110 * 0.2 * 0.25 / 100)
    assert findings[2].area_cm2 is None
    assert findings[3].area_cm2 is None


def test_predict_images_decision_and_batching(tiny_models):
    images, sources = zip(*(_source(60 + 7 * i, 80 - 5 * i, ImagerPixelSpacing=[0.5, 0.5]) for i in range(5)))
    reference = predict_images(tiny_models, list(images), list(sources), batch_size=8)
    one_by_one = predict_images(tiny_models, list(images), list(sources), batch_size=1)
    for a, b in zip(reference, one_by_one):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert a.threshold == tiny_models.manifest.thresholds.probability

    # A large enough mask but a classifier that never reaches the threshold: not flagged, mask kept.
    strict = with_thresholds(tiny_models, probability=1.0, mask=0.0, min_area_px=0)
    for finding in predict_images(strict, list(images), list(sources)):
        assert not finding.flagged and finding.mask.all()
    # A classifier that always flags but a mask below the minimum area: not flagged.
    too_small = with_thresholds(tiny_models, probability=0.0, mask=0.0, min_area_px=10**6)
    assert not any(f.flagged for f in predict_images(too_small, list(images), list(sources)))
    # An empty mask (threshold above any probability) has no area.
    empty = with_thresholds(tiny_models, probability=0.0, mask=1.0, min_area_px=1)
    for finding in predict_images(empty, list(images[:2]), list(sources[:2])):
        assert finding.area_px == 0 and not finding.flagged and finding.area_cm2 == 0.0


@pytest.mark.parametrize(
    ("probability", "area_px", "segmented", "reason"),
    [
        (0.2, 5000, True, "classifier 0.200 < threshold 0.500"),
        (0.99999, 120, True, "classifier 1.000 >= threshold 0.500, but segmented area 120 px < minimum 262 px"),
        (0.91, 5000, True, "classifier 0.910 >= threshold 0.500 and segmented area 5000 px >= minimum 262 px"),
        (0.5, 262, True, "classifier 0.500 >= threshold 0.500 and segmented area 262 px >= minimum 262 px"),
        # Digits enough to tell a probability just under the threshold from it.
        (0.4999, 5000, True, "classifier 0.4999 < threshold 0.5000"),
        (0.7, 0, False, "classifier 0.700 >= threshold 0.500 (classifier only, no segmentation)"),
        (0.3, 0, False, "classifier 0.300 < threshold 0.500 (classifier only, no segmentation)"),
    ],
)
def test_decision_reason_names_the_rule_that_decided(probability, area_px, segmented, reason):
    min_area = 262 if segmented else 0
    assert decision_reason(probability, area_px, 0.5, min_area, segmented=segmented) == reason
    # The words agree with the rule itself: "but" and "<" only where it did not flag.
    flagged = bool(flag_decision(probability, area_px, 0.5, min_area))
    assert (" < " not in reason) == flagged
    assert reason_threshold(reason) == pytest.approx(0.5)


def test_predict_images_gives_the_too_small_area_reason(tiny_models):
    images, sources = zip(*(_source(60, 80, ImagerPixelSpacing=[0.5, 0.5]) for _ in range(2)))
    too_small = with_thresholds(tiny_models, probability=0.0, mask=0.0, min_area_px=10**6)
    for finding in predict_images(too_small, list(images), list(sources)):
        assert not finding.flagged
        assert finding.decision.endswith(f"but segmented area {60 * 80} px < minimum 1000000 px")


def test_predict_images_rejects_mismatched_input(tiny_models):
    image, ds = _source(40, 40)
    with pytest.raises(ValueError, match="1 images but 2"):
        predict_images(tiny_models, [image], [ds, ds])
    _, other = _source(41, 40)
    with pytest.raises(ValueError, match="Rows 41"):
        predict_images(tiny_models, [image], [other])
    assert predict_images(tiny_models, [], []) == []


def test_pixel_spacing_prefers_calibrated_then_imager_spacing_over_magnification():
    ds = Dataset()
    assert pixel_spacing_mm(ds) is None
    ds.ImagerPixelSpacing = [0.2, 0.3]
    assert pixel_spacing_mm(ds) == pytest.approx((0.2, 0.3))
    ds.EstimatedRadiographicMagnificationFactor = 1.25
    assert pixel_spacing_mm(ds) == pytest.approx((0.16, 0.24))
    ds.PixelSpacing = [0.15, 0.15]
    assert pixel_spacing_mm(ds) == pytest.approx((0.15, 0.15))
    ds.PixelSpacing = [0.0, 0.0]  # unusable: fall back on the imager spacing
    assert pixel_spacing_mm(ds) == pytest.approx((0.16, 0.24))
    ds.ImagerPixelSpacing = [0.2, 0]
    assert pixel_spacing_mm(ds) is None


def _header(**attributes) -> Dataset:
    ds = Dataset()
    values = {"Modality": "DX", "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2"}
    values.update(attributes)
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def test_real_chest_radiographs_are_eligible_and_others_say_why_not():
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        ds = pydicom.dcmread(pydicom_data(name), stop_before_pixels=True)
        assert (ds.Modality, ds.BodyPartExamined) == ("CR", "CHEST")
        assert ineligibility_reason(ds) is None, name
    # RG3 is a computed radiograph too, but of an extremity.
    rg3 = pydicom.dcmread(pydicom_data("RG3_UNCR.dcm"), stop_before_pixels=True)
    assert ineligibility_reason(rg3) == "body part EXTREMITY is not chest"
    mr = pydicom.dcmread(pydicom_data("emri_small.dcm"), stop_before_pixels=True)
    assert ineligibility_reason(mr) == "modality MR is not CR or DX"
    assert ineligibility_reason(synthetic_dicom(1, True, size=64)[0]) is None


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({}, None),
        ({"BodyPartExamined": "", "ViewPosition": ""}, None),
        ({"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "AP"}, None),
        ({"Modality": None}, "modality (absent) is not CR or DX"),
        ({"BodyPartExamined": "SKULL"}, "body part SKULL is not chest"),
        ({"ViewPosition": "LL"}, "lateral view (ViewPosition LL)"),
        ({"ViewPosition": "RL"}, "lateral view (ViewPosition RL)"),
        ({"ViewPosition": "LATERAL"}, "lateral view (ViewPosition LATERAL)"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "not a single-frame grayscale image"),
        ({"NumberOfFrames": 2}, "not a single-frame grayscale image"),
        ({"PresentationIntentType": "FOR PROCESSING"}, "For Processing"),
    ],
)
def test_eligibility_rules(attributes, reason):
    found = ineligibility_reason(_header(**attributes))
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


def test_demo_bundle_pipeline_on_a_tiny_set_is_deterministic(tmp_path):
    """The demo builder end to end on ten small images: a loadable, labelled, reproducible bundle."""
    from contract.bundle import DEMO_INTENDED_USE
    from training.demo_model import DEMO_VERSION, build_demo_bundle

    first = build_demo_bundle(tmp_path / "a", seed=4, n_images=10, epochs=1, image_size=64, progress=False)
    second = build_demo_bundle(tmp_path / "b", seed=4, n_images=10, epochs=1, image_size=64, progress=False)
    manifest = load_bundle(first.path).manifest
    assert manifest.synthetic_demo and manifest.intended_use == DEMO_INTENDED_USE
    assert (manifest.name, manifest.version) == ("pleura-demo", DEMO_VERSION)
    assert manifest.classifier.extra["growth_rate"] < 32 and manifest.segmenter.encoder
    assert "synthetic" in manifest.training_data
    assert {"classifier_auc", "classifier_accuracy", "segmentation_dice"} <= set(manifest.metrics)
    assert manifest.metrics["heldout_images"] == 2
    for spec in (manifest.classifier, manifest.segmenter):
        a = torch.load(first.weights_path(spec), weights_only=True)
        b = torch.load(second.weights_path(spec), weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert first.identity.synthetic_demo


@pytest.mark.parametrize("shape", [(2048, 1792), (100, 90)])  # enlarging, and shrinking (antialiased)
def test_the_source_mask_skips_the_resize_only_when_nothing_can_reach_the_threshold(shape) -> None:
    """Most images have no pixel near the mask threshold; their mask is not resized, and it is
    the mask the resize would give. Maps that touch the threshold are resized as before."""
    rng = np.random.default_rng(5)
    threshold = 0.5
    for peak in (0.2, threshold - 2e-5, threshold - 1e-6, threshold, 0.9):
        network_map = (rng.random((256, 256)) * peak).astype(np.float32)
        network_map[100:140, 30:90] = peak
        fast = source_lesion_mask(network_map, shape, threshold)
        assert fast.shape == shape and fast.dtype == bool
        np.testing.assert_array_equal(fast, lesion_mask(mask_to_source(network_map, shape), threshold))
        assert fast.any() == (peak >= threshold)
