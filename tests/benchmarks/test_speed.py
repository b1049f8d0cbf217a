"""The speed CLI on a few keypoints."""

import re

from benchmarks.speed import main


def test_speed_prints_both_times_and_ratio(capsys):
    assert main(["--descriptor", "rootsift", "--num-features", "200", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "800x640" in out
    times = re.findall(r"(rootsift|cv2 SIFT):\s+([\d.]+) ms\s+(\d+) descriptors/s", out)
    assert [t[0] for t in times] == ["rootsift", "cv2 SIFT"] and all(float(t[1]) > 0 for t in times)
    assert re.search(r"ratio:\s+[\d.]+ x", out)


def test_speed_rejects_unknown_descriptor_and_image(capsys, tmp_path):
    assert main(["--descriptor", "nosuch"]) == 2
    assert "available:" in capsys.readouterr().err
    assert main(["--descriptor", "sift", "--image", str(tmp_path / "missing.ppm")]) == 2
    assert "missing.ppm" in capsys.readouterr().err
