"""Shared fixtures. Test helpers live beside this file (services.py, dicom_samples.py, dicom_peers.py)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Every worker the tests start (inference_backend auto) shares one ONNX export of each bundle per
# run, instead of exporting it again into each test's storage; the export itself, per storage, is
# tested in test_worker_speed.py.
os.environ.setdefault("PLEURA_ONNX_CACHE_DIR", tempfile.mkdtemp(prefix="pleura-test-onnx-"))


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    """The synthetic demo bundle, as `./scripts/setup.sh` builds it; built here when it is missing."""
    from config.settings import default_storage_dir
    from training.demo_model import ensure_demo_bundle

    target = Path(os.environ.get("PLEURA_MODEL_BUNDLE_DIR") or os.environ.get("PLEURA_MODEL_DIR")
                  or default_storage_dir() / "models" / "demo")
    ensure_demo_bundle(target, progress=False)
    return target


@pytest.fixture(scope="session")
def synthetic_siim(tmp_path_factory) -> Path:
    """A small synthetic SIIM-ACR layout for the training tests: 24 images of 64 px, half positive,
    two images per patient, each mask written as two RLE rows. Read-only: copy it to change it."""
    from training.synthetic import write_siim_dataset

    return write_siim_dataset(
        tmp_path_factory.mktemp("siim") / "data", 24, size=64, seed=1, images_per_patient=2, split_masks=True
    )


@pytest.fixture(scope="session")
def tiny_base_bundle(tmp_path_factory) -> Path:
    """A bundle with tiny random networks at 64 px, to stand for `pleura train --base` (synthetic demo)."""
    import torch

    from contract.bundle import DEMO_INTENDED_USE, Manifest, NetworkSpec, Preprocessing, Thresholds, write_manifest
    from contract.networks import build_network

    root = tmp_path_factory.mktemp("tiny-base")
    manifest = Manifest(
        name="tiny-base",
        version="0",
        intended_use=DEMO_INTENDED_USE,
        synthetic_demo=True,
        preprocessing=Preprocessing(input_size=64),
        classifier=NetworkSpec(
            architecture="densenet121", weights_file="classifier.pt",
            extra={"init_features": 8, "growth_rate": 4, "block_config": [2, 2]},
        ),
        segmenter=NetworkSpec(
            architecture="unet", encoder="resnet18", weights_file="segmenter.pt",
            extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
        ),
        thresholds=Thresholds(min_area_px=4),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for spec in (manifest.classifier, manifest.segmenter):
            torch.save(build_network(spec, manifest.preprocessing).state_dict(), root / spec.weights_file)
    write_manifest(root, manifest)
    return root


@pytest.fixture
def peers():
    """A real HL7 MLLP listener and a real webhook receiver on loopback, stopped afterwards."""
    from notify_peers import MllpListener, WebhookReceiver

    listener, receiver = MllpListener(), WebhookReceiver()
    yield listener, receiver
    listener.stop()
    receiver.stop()


@pytest.fixture()
def node(tmp_path: Path):
    """The Storage SCP alone, with its ledger and store (scp_node.py)."""
    from scp_node import running_node

    yield from running_node(tmp_path)
@pytest.fixture(scope="session")
def ct_demo_bundle() -> Path:
    """The synthetic CT demo bundle, as `pleura demo-model` builds it; built here when it is missing."""
    from config.settings import default_storage_dir
    from training.ct_demo_model import ensure_ct_demo_bundle

    target = Path(os.environ.get("PLEURA_CT_MODEL_DIR") or default_storage_dir() / "models" / "ct-demo")
    ensure_ct_demo_bundle(target, progress=False)
    return target


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under pytest-xdist, on the controller once every worker is done: no object Pleura wrote
    anywhere in the run carries a file path or a UID in its free text (tests/result_text.py).

    tests/test_zz_result_text.py makes that check at the end of a run in one process; with several
    workers it sees only its own worker's objects and runs while the others still write theirs.
    """
    config = session.config
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from result_text import offending_texts, pleura_results

    root = config._tmp_path_factory.getbasetemp()  # the workers' temporary folders lie under it
    written = pleura_results(root)
    problems = [problem for path in written for problem in offending_texts(path)]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter:
            reporter.write_line(f"FAILED result text: {len(problems)} text values with a path or UID, e.g. {problems[:5]}", red=True)
    elif reporter:
        reporter.write_line(f"result text: {len(written)} objects Pleura wrote in this run, none with a path or UID in its text")
