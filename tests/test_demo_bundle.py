"""The demo bundle is built once however many processes ask for it at the same time, and a
reader never sees half of it."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

import training.demo_model as demo_model
from contract.bundle import BundleError, load_bundle


def test_concurrent_requests_build_once_and_swap_in_a_complete_bundle(tmp_path: Path, demo_bundle: Path, monkeypatch) -> None:
    builds: list[Path] = []

    def copy_of_the_real_bundle(out: Path, **_: object):
        builds.append(out)
        assert out.name.endswith(".building")  # never built in place
        time.sleep(0.5)
        shutil.copytree(demo_bundle, out)
        return load_bundle(out)

    monkeypatch.setattr(demo_model, "build_demo_bundle", copy_of_the_real_bundle)
    target = tmp_path / "models" / "demo"
    outcomes: list[bool] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(demo_model.ensure_demo_bundle(target, progress=False)[1]))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(builds) == 1 and sorted(outcomes) == [False, False, True]
    assert demo_model.is_current_demo_bundle(load_bundle(target))
    assert not any(p.name.startswith(".demo.") and p.is_dir() for p in target.parent.iterdir())

    # A trained model in the way is never replaced.
    manifest = target / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"synthetic_demo": true', '"synthetic_demo": false'))
    with pytest.raises(BundleError, match="trained model"):
        demo_model.ensure_demo_bundle(target, progress=False)
    assert len(builds) == 1
