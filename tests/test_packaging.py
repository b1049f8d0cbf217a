"""`pip install .` (not editable) ships the weights: ExemplarDescriptor() works from any folder."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_install_ships_the_default_model(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO)],
        check=True,
        cwd=tmp_path,
    )
    assert (target / "exemplar_desc" / "weights" / "exemplar-fast.pt").is_file()
    for module in ("training/loop.py", "sfm/__main__.py", "train.py"):
        assert (target / "exemplar_desc" / module).is_file(), module
    code = (
        "import exemplar_desc, cv2, numpy as np;"
        "d = exemplar_desc.ExemplarDescriptor();"
        "k, x = d.compute(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), [cv2.KeyPoint(32, 32, 4)]);"
        "print(exemplar_desc.__file__, x.shape)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert out.startswith(str(target)) and "(1, 128)" in out
