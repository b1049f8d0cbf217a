"""The speed CLI on a few keypoints."""

import re

import pytest

from benchmarks.speed import main


def test_speed_table_split_and_ratio(capsys, random_model):
    assert main(["--descriptor", f"exemplar:{random_model}", "--counts", "100,300", "--images", "3",
                 "--num-features", "50", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "800x640" in out
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)x$", out, re.M)
    assert [(int(r[0]), int(r[1])) for r in rows] == [(100, 1), (300, 1), (50, 3)]
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)
    split = re.search(r"split at 50 keypoints \(ms\): upload ([\d.]+), pyramid ([\d.]+), sampling ([\d.]+), "
                      r"network ([\d.]+), download ([\d.]+)", out)
    assert split and float(split[4]) > 0


def test_speed_other_descriptors_have_no_split(capsys):
    assert main(["--descriptor", "rootsift", "--counts", "200", "--images", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+200\s+1\s+[\d.]+", out, re.M) and "split" not in out


@pytest.mark.parametrize(
    "args, message",
    [(["--repeats", "0"], "--repeats 0"), (["--counts", "100,x"], "--counts '100,x'"), (["--counts", "0"], "--counts 0"),
     (["--images", "-1"], "--images -1"), (["--threads", "0"], "--threads 0"), (["--device", "tpu"], "--device 'tpu'"),
     (["--num-features", "0"], "--num-features 0"), (["--descriptor", "nosuch"], "available:")],
)
def test_speed_rejects_bad_options(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_speed_rejects_a_missing_image(capsys, tmp_path):
    assert main(["--descriptor", "sift", "--image", str(tmp_path / "missing.ppm")]) == 2
    assert "missing.ppm" in capsys.readouterr().err


def test_cpu_levers_rejects_bad_options(capsys, tmp_path):
    from benchmarks.cpu_levers import main as levers

    assert levers(["--image", str(tmp_path / "missing.ppm")]) == 2
    assert levers(["--image", str(tmp_path / "missing.ppm"), "--repeats", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "missing.ppm" in err[0] and "--repeats 0" in err[1]
