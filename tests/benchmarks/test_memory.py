"""Describing many keypoints holds a few batches of patches, never all of them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _extra_mib(keypoints: int, batch_size: int, model) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--width", "640", "--height", "480", "--keypoints", str(keypoints),
         "--batch-size", str(batch_size), "--model", str(model)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    return float(re.search(r"extra (-?\d+) MiB", out)[1])


def test_memory_is_bounded_by_the_batch(random_model):
    # 3,000 keypoints in one batch take about 120 MiB above the loaded model (patches, sampling
    # grid, activations); in batches of 256 the same call must stay far below that.
    assert _extra_mib(3000, 256, random_model) < 80
