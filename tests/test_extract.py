"""The folder extractor CLI: hloc layout, re-runs, workers, bad options, the SfM command's magnification."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from exemplar_desc import ExemplarDescriptor
from exemplar_desc.checks import OptionError
from exemplar_desc.extract import main
from exemplar_desc.extraction import SFM_MAGNIFICATION, resolve_magnification
from exemplar_desc.formats import hloc
from exemplar_desc.sfm.__main__ import main as sfm_main

from .conftest import shared_data
from .sfm.synth import write_views

NAMES = ["a.png", "b.png", "sub/c.png", "sub/d.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract") / "images"
    write_views(folder, NAMES, size=(240, 320))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    return folder


def _args(images, out, model, *extra):
    return ["--images", str(images), "--out", str(out), "--descriptor", f"exemplar:{model}",
            "--max-size", "200", "--max-keypoints", "300", "--batch-size", "128", *extra]


def _contents(path) -> dict:
    """Every dataset and attribute of an HDF5 file, by path."""
    found = {"/": dict(path.attrs)}

    def visit(name, obj):
        found[name] = (obj[()], dict(obj.attrs)) if isinstance(obj, h5py.Dataset) else dict(obj.attrs)

    path.visititems(visit)
    return found


def test_hloc_layout_and_workers_give_the_same_file(images, tmp_path, random_model, capsys):
    one, two = tmp_path / "w0" / "features.h5", tmp_path / "w2" / "features.h5"
    assert main(_args(images, one, random_model, "--workers", "0")) == 0
    assert "4 images (0 reused, 1 skipped)" in capsys.readouterr().out
    assert main(_args(images, two, random_model, "--workers", "2")) == 0
    with h5py.File(one, "r") as f, h5py.File(two, "r") as g:
        assert f.attrs["complete"] and f.attrs["format"] == hloc.FEATURES_FORMAT
        assert sorted(f) == ["a.png", "b.png", "sub"] and sorted(f["sub"]) == ["c.png", "d.png"]
        for name in NAMES:
            grp = f[name]
            n = grp["keypoints"].shape[0]
            assert 50 < n <= 310  # SIFT keeps keypoints tied at the cut
            assert grp["keypoints"].dtype == np.float32 and grp["keypoints"].shape == (n, 2)
            assert grp["keypoints"].attrs["uncertainty"] == pytest.approx(320 / 200)  # 1 px at max size 200
            assert grp["descriptors"].dtype == np.float32 and grp["descriptors"].shape == (128, n)
            np.testing.assert_allclose(np.linalg.norm(grp["descriptors"][()], axis=0), 1, atol=1e-5)
            for key in ("scores", "scales", "oris"):
                assert grp[key].dtype == np.float32 and grp[key].shape == (n,)
            assert grp["image_size"].dtype == np.int32 and grp["image_size"][()].tolist() == [320, 240]
            assert grp["keypoints"][()][:, 0].max() > 200  # original pixels, not the 200-px image's
            assert len(grp.attrs["sha1"]) == 40 and "sha256" in grp.attrs["descriptor_identity"]
        a, b = _contents(f), _contents(g)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], tuple):
                np.testing.assert_array_equal(a[key][0], b[key][0], err_msg=key)
                assert a[key][1] == b[key][1], key
            else:
                assert a[key] == b[key], key


def test_two_processes_write_what_one_writes(images, tmp_path, random_model):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    assert main(_args(images, one, random_model, "--workers", "0")) == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "exemplar_desc.extract", *_args(images, two, random_model, "--workers", "0")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("4 images (0 reused, 1 skipped)") == 1  # rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]  # parts merged and removed
    with h5py.File(one, "r") as f, h5py.File(two, "r") as g:
        a, b = _contents(f), _contents(g)
        assert list(f) == list(g) and a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], tuple):
                # Two processes run one thread each: float sums may round differently.
                np.testing.assert_allclose(a[key][0], b[key][0], atol=1e-6, err_msg=key)
                assert a[key][1] == b[key][1], key
            else:
                assert a[key] == b[key], key


def test_rerun_reuses_without_describing(images, tmp_path, random_model, capsys, monkeypatch):
    out = tmp_path / "features.h5"
    assert main(_args(images, out, random_model, "--workers", "0")) == 0
    with h5py.File(out, "r") as f:
        before = _contents(f)

    def refuse(*args, **kwargs):
        raise AssertionError("described again")

    monkeypatch.setattr(ExemplarDescriptor, "compute", refuse)
    capsys.readouterr()
    assert main(_args(images, out, random_model, "--workers", "0")) == 0
    assert "4 images (4 reused, 1 skipped)" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        after = _contents(f)
    assert before.keys() == after.keys()
    np.testing.assert_array_equal(before["a.png/descriptors"][0], after["a.png/descriptors"][0])
    # Other settings describe again.
    with pytest.raises(AssertionError, match="described again"):
        main(_args(images, out, random_model, "--workers", "0", "--magnification", "7"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]  # no partial file left


@pytest.mark.parametrize(
    "extra, message",
    [(["--workers", "-1"], "--workers -1"), (["--max-keypoints", "0"], "--max-keypoints 0"),
     (["--max-size", "8"], "--max-size 8"), (["--batch-size", "0"], "--batch-size 0"),
     (["--magnification", "inf"], "--magnification inf"), (["--device", "tpu"], "--device 'tpu'"),
     (["--workers", "1.5"], "invalid int value")],
)
def test_bad_options_give_one_error_line(images, tmp_path, random_model, capsys, extra, message):
    with pytest.raises(SystemExit) if "invalid" in message else _no_exit():
        assert main(_args(images, tmp_path / "f.h5", random_model, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "f.h5").exists()


def test_bad_paths_and_descriptors(tmp_path, images, capsys):
    assert main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "f.h5")]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["--images", str(images), "--out", str(tmp_path), "--descriptor", "sift"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["--images", str(images), "--out", str(tmp_path / "f.h5"), "--descriptor", "nosuch"]) == 2
    assert "--descriptor 'nosuch'" in capsys.readouterr().err
    assert main(["--images", str(images), "--out", str(tmp_path / "f.h5"), "--descriptor", "sift", "--batch-size", "8"]) == 2
    assert "only applies to an Exemplar" in capsys.readouterr().err


def test_magnification_names_and_numbers():
    assert resolve_magnification("sfm") == SFM_MAGNIFICATION == 5.0
    assert resolve_magnification("card") is None and resolve_magnification(None) is None
    assert resolve_magnification("7") == resolve_magnification(7) == 7.0
    for bad in ("big", "0", "-1", "inf", 0):
        with pytest.raises(OptionError) as err:
            resolve_magnification(bad)
        assert err.value.option == "magnification"


def test_extract_and_the_sfm_command_write_the_same_features_for_the_default_model(tmp_path):
    # Features for hloc are features for a reconstruction: the same patches as the SfM command's.
    images = tmp_path / "images"
    images.mkdir()
    source = shared_data("sfm", "sceaux_castle")
    for path in sorted(source.iterdir())[:3]:
        shutil.copy(path, images)
    assert main(["--images", str(images), "--out", str(tmp_path / "features.h5"), "--max-size", "640",
                 "--workers", "0"]) == 0
    assert sfm_main(["--images", str(images), "--out", str(tmp_path / "sfm"), "--max-size", "640"]) in (0, 3)
    with h5py.File(tmp_path / "features.h5", "r") as f, h5py.File(tmp_path / "sfm" / "features.h5", "r") as g:
        assert dict(f.attrs) == dict(g.attrs) and f"magnification {SFM_MAGNIFICATION:g}," in f.attrs["descriptor_identity"]
        assert list(f) == list(g) and len(f) == 3
        for name in f:
            assert f[name]["keypoints"].shape[0] > 1000
            for key in ("keypoints", "descriptors"):
                np.testing.assert_array_equal(f[name][key][()], g[name][key][()], err_msg=f"{name}/{key}")


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
