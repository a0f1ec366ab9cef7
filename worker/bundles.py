"""Which model bundle a worker loads for each kind of analysis: the one place that decides.

``radiograph``: ``PLEURA_MODEL_DIR``, else the demo bundle in the storage dir. ``ct``:
``PLEURA_CT_MODEL_DIR``, else the CT demo bundle in the storage dir (``models/ct-demo``, built on
first use by :func:`training.ct_demo_model.ensure_ct_demo_bundle`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from config.settings import Settings

__all__ = ["BundleKind", "active_bundle_dir", "is_default_bundle_dir"]

BundleKind = Literal["radiograph", "ct"]
CT_DEMO_DIR = Path("models") / "ct-demo"


def active_bundle_dir(settings: Settings, kind: BundleKind) -> Path:
    """The bundle directory a worker uses for ``kind``."""
    if kind == "radiograph":
        return settings.bundle_dir
    if kind == "ct":
        if settings.ct_model_dir is not None:
            return settings.ct_model_dir.expanduser().resolve()
        return settings.storage_dir / CT_DEMO_DIR
    raise ValueError(f"unknown bundle kind {kind!r}: radiograph or ct")


def is_default_bundle_dir(settings: Settings, kind: BundleKind) -> bool:
    """Whether no setting names the ``kind`` bundle (the demo bundle is then built when missing)."""
    return (settings.model_dir if kind == "radiograph" else settings.ct_model_dir) is None
