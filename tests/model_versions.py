"""Registered versions for the registry tests: copies of a bundle with their own name and version."""

from __future__ import annotations

import shutil
from pathlib import Path

from contract.bundle import load_bundle, write_manifest


def make_version(base: Path, target: Path, version: str, name: str = "tiny", **changes) -> Path:
    """A copy of ``base`` whose manifest says ``name``/``version`` (and any other ``changes``)."""
    shutil.copytree(base, target)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    manifest = load_bundle(target).manifest.model_copy(update={"name": name, "version": version, **changes})
    write_manifest(target, manifest)
    return target
