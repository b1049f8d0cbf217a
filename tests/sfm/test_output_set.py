"""The outputs in an SfM output folder form one set: an interrupted run leaves the previous
set or the new one, never a mix, and a re-run completes it."""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import pycolmap
import pytest

from exemplar_desc.sfm import pipeline
from exemplar_desc.sfm.__main__ import main
from exemplar_desc.formats.hloc import pair_key

from .synth import write_views

FAST = ["--descriptor", "sift", "--max-size", "200", "--max-keypoints", "300"]
NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png"]


def _digests(out):
    """Content of every file of ``out`` but the staging folder of an unfinished run."""
    return {str(p.relative_to(out)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != pipeline.STAGING_DIR}


def _image_set(out):
    """The images of the set in ``out``, after checking that every output names the same ones."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["entries"]) == sorted(set(os.listdir(out)) - {"manifest.json", pipeline.STAGING_DIR})
    with h5py.File(out / "features.h5", "r") as f:
        images = set(f.keys())
        assert f.attrs["complete"]
    pairs = [tuple(line.split()) for line in (out / "pairs.txt").read_text().splitlines()]
    assert {n for pair in pairs for n in pair} == images
    with h5py.File(out / "matches.h5", "r") as f:
        assert {f"{a}/{b}" for a in f for b in f[a]} == {pair_key(*pair) for pair in pairs}
    with pycolmap.Database.open(out / "database.db") as db:
        assert {image.name for image in db.read_all_images()} == images
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_readable"] == len(images) and summary["pairs"] == len(pairs)
    registered = set(summary["models"][0]["registered_images"])
    assert registered | set(summary["images_not_registered"]) == images
    rec = pycolmap.Reconstruction(out / "sparse" / "0")
    assert {rec.images[i].name for i in rec.reg_image_ids()} == registered
    assert sorted(os.listdir(out / "sparse")) == [str(m["index"]) for m in summary["models"]]
    return images


def test_interrupted_runs_leave_one_set_and_a_rerun_completes_it(tmp_path, monkeypatch):
    images, out = tmp_path / "images", tmp_path / "out"
    write_views(images, NAMES)
    for name in NAMES[3:]:  # added later
        os.rename(images / name, tmp_path / name)
    argv = ["--images", str(images), "--out", str(out), *FAST]
    assert main(argv) == 0
    assert _image_set(out) == set(NAMES[:3])
    first = _digests(out)

    # Killed while mapping, after the new database was written: the previous set stays as it was.
    os.rename(tmp_path / "d.png", images / "d.png")
    run_mapper = pipeline.run_mapper

    def killed(database_path, *args, **kwargs):
        with pycolmap.Database.open(database_path) as db:
            assert db.num_images() == 4  # the new run got as far as its database
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_mapper", killed)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert _digests(out) == first and _image_set(out) == set(NAMES[:3])
    assert not (out / pipeline.STAGING_DIR).exists()

    # A re-run completes the set (discarding the leftovers of a run killed without clean-up)
    # and reuses the features of the images it had.
    monkeypatch.setattr(pipeline, "run_mapper", run_mapper)
    (out / pipeline.STAGING_DIR).mkdir()
    (out / pipeline.STAGING_DIR / "features.h5").write_bytes(b"half a file")
    assert main(argv) == 0
    assert _image_set(out) == set(NAMES[:4])
    assert json.loads((out / "summary.json").read_text())["images_reused"] == 3
    assert not (out / pipeline.STAGING_DIR).exists()

    # Killed while the finished set is moved into place: no set is claimed until a re-run
    # moves the rest, and then the new set is complete.
    os.rename(tmp_path / "e.png", images / "e.png")
    remove = pipeline._remove

    def killed_remove(path):
        killed_remove.calls += 1
        if killed_remove.calls == 3:
            raise KeyboardInterrupt
        remove(path)

    killed_remove.calls = 0
    monkeypatch.setattr(pipeline, "_remove", killed_remove)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert not (out / "manifest.json").exists()
    assert (out / pipeline.STAGING_DIR / "manifest.json").is_file()
    monkeypatch.setattr(pipeline, "_remove", remove)
    assert main(argv) == 0
    assert _image_set(out) == set(NAMES)
    assert json.loads((out / "summary.json").read_text())["images_reused"] == 5
    assert not (out / pipeline.STAGING_DIR).exists()


def test_a_set_replaces_every_entry_of_the_previous_one(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_views(images, NAMES[:3])
    assert main(["--images", str(images), "--out", str(out), *FAST, "--export-colmap"]) == 0
    assert (out / "colmap_features").is_dir()
    assert main(["--images", str(images), "--out", str(out), *FAST]) == 0
    assert not (out / "colmap_features").exists()  # not part of the new set
    _image_set(out)


KILL = """
import os, signal, sys
from exemplar_desc.sfm import pipeline
from exemplar_desc.sfm.__main__ import main

def kill(*args, **kwargs):
    kill.calls += 1
    if kill.calls == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no finally
    return original(*args, **kwargs)

kill.calls = 0
original = getattr(pipeline, sys.argv[1])
setattr(pipeline, sys.argv[1], kill)
main(sys.argv[3:])
"""


@pytest.mark.parametrize("stage, call", [("run_mapper", 1), ("_remove", 3)], ids=["mapping", "moving into place"])
def test_sigkill_leaves_one_set_and_a_rerun_completes_it(tmp_path, stage, call):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    images, out = tmp_path / "images", tmp_path / "out"
    write_views(images, NAMES[:4])
    os.rename(images / "d.png", tmp_path / "d.png")
    argv = ["--images", str(images), "--out", str(out), *FAST]
    assert main(argv) == 0
    first = _digests(out)
    os.rename(tmp_path / "d.png", images / "d.png")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", KILL, stage, str(call), *argv], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / pipeline.STAGING_DIR).is_dir()  # left behind by the killed run
    if stage == "run_mapper":  # before the commit point: the previous set, untouched
        assert _digests(out) == first
        assert _image_set(out) == set(NAMES[:3])
    else:  # while moving: no finished set is claimed
        assert not (out / "manifest.json").exists()
    assert main(argv) == 0
    assert _image_set(out) == set(NAMES[:4])
    assert not (out / pipeline.STAGING_DIR).exists()
