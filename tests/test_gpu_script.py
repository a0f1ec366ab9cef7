"""benchmarks/gpu.sh, the script a lent GPU runs, kept working: every step of it on the CPU at a
tiny size (its figures mean nothing here; that it runs, and writes one Markdown section, does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from training.presets import PRESETS

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_script_runs_every_step_on_the_cpu_at_a_tiny_size(tmp_path: Path) -> None:
    section = tmp_path / "section.md"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--tiny", "--out", str(section)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    text = section.read_text()
    assert run.returncode == 0, text + run.stderr
    assert "**failed" not in text
    assert text.startswith("### GPU script (cpu, tiny)")
    for heading in (
        "#### Bare forward pass: pleura-demo",
        "#### Bare forward pass: benchmark-cls-cbr-baseline-seg-unet-resnet18",
        "#### Full analysis: demo network, precision auto",
        "#### Full analysis: recipe network, precision auto",
        "#### CT series: demo network",
        "#### One bare training step per preset",
    ):
        assert heading in text, heading
    assert text.count("full analysis: ") == 2 and text.count("pipeline (read, HU, segment") == 1
    step_rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert {line.split("`")[1] for line in step_rows} == set(PRESETS)
    assert not [line for line in step_rows if "n/a" in line], step_rows


def test_the_gpu_script_refuses_an_unknown_option() -> None:
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--gpus", "2"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "unknown option --gpus" in run.stderr
