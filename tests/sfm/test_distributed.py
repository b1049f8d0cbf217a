"""SfM extraction and matching on 2 processes under torchrun (CPU, Gloo): the same features.h5 and
matches.h5 as one process, reuse across runs, and a failing or hanging rank ending the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np

import exemplar_desc
from exemplar_desc.sfm import pipeline
from exemplar_desc.sfm.__main__ import main

from .synth import write_views

REPO = Path(exemplar_desc.__file__).resolve().parents[1]
FAST = ["--max-size", "200", "--max-keypoints", "300"]
# Nested names make nested HDF5 groups in features.h5 and "sub-d.png" pair groups in matches.h5.
NAMES = ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _torchrun(args: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    program = ["-m", "exemplar_desc.sfm"] if script is None else [str(script)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program, *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)


def _tree(path: Path) -> dict:
    """Every object of an HDF5 file: path -> (attributes, data or None for a group)."""
    objects = {}
    with h5py.File(path, "r") as f:
        objects["/"] = (dict(f.attrs), None)
        f.visititems(lambda name, obj: objects.setdefault(
            name, (dict(obj.attrs), obj[()] if isinstance(obj, h5py.Dataset) else None)))
    return objects


def _assert_same_file(path: Path, reference: Path, atol: float = 0.0) -> None:
    """Same groups, datasets (dtype, shape, values; ``descriptors`` and ``matching_scores0`` within
    ``atol``) and attributes (value and type) as ``reference``."""
    got, want = _tree(path), _tree(reference)
    assert got.keys() == want.keys()
    for name, (attrs, data) in want.items():
        assert got[name][0].keys() == attrs.keys(), name
        for key, value in attrs.items():
            assert type(got[name][0][key]) is type(value) and got[name][0][key] == value, (name, key)
        if data is None:
            assert got[name][1] is None, name
            continue
        assert got[name][1].dtype == data.dtype and got[name][1].shape == data.shape, name
        if name.endswith(("descriptors", "matching_scores0")):
            np.testing.assert_allclose(got[name][1], data, rtol=0, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name][1], data, err_msg=name)


def _assert_same_outputs(two: Path, one: Path, atol: float = 0.0) -> dict:
    """The 2-process set in ``two`` agrees with the 1-process set in ``one``; returns its summary."""
    for name in ("features.h5", "matches.h5"):
        _assert_same_file(two / name, one / name, atol)
    assert (two / "pairs.txt").read_text() == (one / "pairs.txt").read_text()
    assert json.loads((two / "manifest.json").read_text()) == json.loads((one / "manifest.json").read_text())
    assert not (two / pipeline.STAGING_DIR).exists()
    summaries = [json.loads((out / "summary.json").read_text()) for out in (two, one)]
    for key in ("images_readable", "images_reused", "mean_keypoints", "pairs", "pairs_with_matches", "mean_matches_per_pair"):
        assert summaries[0][key] == summaries[1][key], key
    return summaries[0]


def test_two_processes_write_what_one_process_writes_and_reuse_features(tmp_path):
    images = tmp_path / "images"
    write_views(images, NAMES)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--images", str(images), "--descriptor", "sift", *FAST]
    assert main([*args, "--out", str(one)]) == 0
    done = _torchrun([*args, "--out", str(two)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("images: 5 found") == 1  # rank 0 alone prints
    summary = _assert_same_outputs(two, one)
    assert summary["images_reused"] == 0 and summary["images_registered"] == 5

    # One changed image: the ranks describe it again and reuse the other four.
    changed = cv2.imread(str(images / "c.png"), cv2.IMREAD_GRAYSCALE)
    changed[:20, :20] = 0
    cv2.imwrite(str(images / "c.png"), changed)
    assert main([*args, "--out", str(one)]) == 0
    done = _torchrun([*args, "--out", str(two)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _assert_same_outputs(two, one)["images_reused"] == 4


def test_two_processes_exemplar_descriptors_equal_one_process(tmp_path, random_model):
    images = tmp_path / "images"
    write_views(images, NAMES)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--images", str(images), "--descriptor", f"exemplar:{random_model}", *FAST, "--min-model-size", "2"]
    assert main([*args, "--out", str(one)]) == 0
    done = _torchrun([*args, "--out", str(two)])
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_outputs(two, one, atol=1e-5)  # torchrun gives each rank one thread: other sums


FAULTY_RANK = """
import os, sys, time
from exemplar_desc import extraction
from exemplar_desc.sfm.__main__ import main

def faulty(*args, **kwargs):
    if sys.argv[1] == "hang":
        time.sleep(600)
    raise RuntimeError("disk on fire")

if os.environ["RANK"] == "1":
    extraction.extract_features = faulty
sys.exit(main(sys.argv[2:]))
"""


def _run_with_faulty_rank(tmp_path: Path, mode: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    images, out = tmp_path / "images", tmp_path / "out"
    write_views(images, NAMES[:3])
    script = tmp_path / "faulty_rank.py"
    script.write_text(FAULTY_RANK)
    start = time.monotonic()
    done = _torchrun([mode, "--images", str(images), "--out", str(out), "--descriptor", "sift", *FAST, *extra], script)
    seconds = time.monotonic() - start
    assert done.returncode != 0
    assert not (out / "manifest.json").exists() and not (out / pipeline.STAGING_DIR).exists()
    return done, seconds


def test_failing_rank_ends_the_job_and_rank_0_names_it(tmp_path):
    done, _ = _run_with_faulty_rank(tmp_path, "fail")
    assert "error: extracting features failed on rank 1: RuntimeError: disk on fire" in done.stderr, done.stderr[-3000:]


def test_hanging_rank_ends_the_job_after_the_timeout(tmp_path):
    done, seconds = _run_with_faulty_rank(tmp_path, "hang", "--dist-timeout", "0.05")  # 3 seconds
    assert "error: not every rank finished extracting features within the timeout of 0.05 minutes" in done.stderr, \
        done.stderr[-3000:]
    assert seconds < 60
