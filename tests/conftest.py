"""Shared fixtures. Test helpers live beside this file (services.py, dicom_samples.py, dicom_peers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    """The synthetic demo bundle, as `./scripts/setup.sh` builds it; built here when it is missing."""
    from config.settings import default_storage_dir
    from training.bundle import BundleError, load_bundle
    from training.demo_model import build_demo_bundle, is_current_demo_bundle

    target = Path(os.environ.get("PLEURA_MODEL_DIR") or default_storage_dir() / "models" / "demo")
    try:
        current = is_current_demo_bundle(load_bundle(target))
    except BundleError:
        current = False
    if not current:
        build_demo_bundle(target, progress=False)
    return target
