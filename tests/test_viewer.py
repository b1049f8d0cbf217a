"""Match viewer (python -m exemplar_desc.viewer): table, PNG, RANSAC and bad input."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data

from exemplar_desc.registry import create_descriptor
from exemplar_desc.viewer import TITLE_HEIGHT, TooFewMatchesError, detect_keypoints, fit_geometry, main, match_pair

# Image 2 is image 1 seen through this homography (a turn, a zoom and some perspective).
H_TRUE = np.array([[0.9, -0.2, 60.0], [0.15, 0.95, 20.0], [1e-4, -5e-5, 1.0]])
SIZE2 = (560, 480)  # (width, height) of image 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Paths of a photo (512 x 512) and its warp by H_TRUE (560 x 480), PNG."""
    folder = tmp_path_factory.mktemp("pair")
    gray = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2GRAY)
    paths = folder / "a.png", folder / "b.png"
    cv2.imwrite(str(paths[0]), gray)
    cv2.imwrite(str(paths[1]), cv2.warpPerspective(gray, H_TRUE, SIZE2))
    return [str(p) for p in paths]


def run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr), argparse's exits included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_table_and_png(pair, random_model, tmp_path, capsys):
    out = tmp_path / "m.png"
    code, stdout, stderr = run([*pair, "--descriptor", f"exemplar:{random_model}", "--compare", "sift", "--out", out], capsys)
    assert code == 0, stderr
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("descriptor"))
    assert lines[header].split() == ["descriptor", "keypoints", "matches", "inliers", "ratio", "seconds"]
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [r[0] for r in rows] == [f"exemplar:{random_model}", "sift"]
    for name, kps, matches, inliers, ratio, seconds in rows:
        assert 0 < int(inliers) <= int(matches) and float(ratio) == pytest.approx(int(inliers) / int(matches), abs=1e-3)
    sift_inliers = int(rows[1][3])
    assert sift_inliers > 100  # a known homography: SIFT finds it
    image = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    # Two panels stacked, each a title bar over both images side by side (image 2, shorter, is padded).
    assert image.shape == (2 * (TITLE_HEIGHT + 512), 512 + SIZE2[0], 3)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_ransac_recovers_the_homography(pair):
    grays = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in pair]
    kps = [detect_keypoints(g, 2000) for g in grays]
    result = match_pair("sift", create_descriptor("sift"), *grays, *kps, "homography", 3.0)
    assert result.num_inliers > 100 and result.model is not None
    corners = np.float64([[0, 0], [511, 0], [511, 511], [0, 511]])[:, None]
    error = np.linalg.norm(cv2.perspectiveTransform(corners, result.model) - cv2.perspectiveTransform(corners, H_TRUE), axis=2)
    assert error.max() < 2.0, error
    # Seeded RANSAC: the same inliers again.
    again = match_pair("sift", create_descriptor("sift"), *grays, *kps, "homography", 3.0)
    assert np.array_equal(again.inliers, result.inliers)
    pts1 = np.float32([kps[0][i].pt for i in result.matches[:, 0]])
    pts2 = np.float32([kps[1][j].pt for j in result.matches[:, 1]])
    fundamental, inliers = fit_geometry(pts1, pts2, "fundamental", 1.0)
    assert fundamental.shape == (3, 3) and inliers.sum() > 100
    with pytest.raises(TooFewMatchesError, match="at least 8"):
        fit_geometry(pts1[:7], pts2[:7], "fundamental", 1.0)


def _assert_one_error(code, stdout, stderr, match, status=2):
    assert code == status
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], stderr
    assert "Traceback" not in stderr and "wrote" not in stdout


def test_missing_file(pair, tmp_path, capsys):
    out = tmp_path / "m.png"
    _assert_one_error(*run([pair[0], tmp_path / "none.png", "--descriptor", "sift", "--out", out], capsys), "IMG2", 2)
    assert not out.exists()


def test_unreadable_file(pair, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "m.png"
    _assert_one_error(*run([bad, pair[1], "--descriptor", "sift", "--out", out], capsys), "not a readable image")
    assert not out.exists()


def test_too_few_matches(pair, tmp_path, capsys):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200), 128, np.uint8))  # no keypoints at all
    out = tmp_path / "m.png"
    _assert_one_error(*run([pair[0], blank, "--descriptor", "sift", "--out", out], capsys), "sift: 0 matches", status=1)
    assert not out.exists()


@pytest.mark.parametrize(
    "options, match",
    [
        (["--geometry", "affine"], "--geometry"),
        (["--threshold", "-1"], "--threshold"),
        (["--max-keypoints", "0"], "--max-keypoints"),
        (["--descriptor", "surf"], "--descriptor 'surf'"),
        (["--compare", "exemplar:no-such-model"], "unknown model"),
        (["--out", "m.jpg"], "must end with .png"),
    ],
)
def test_bad_options(pair, tmp_path, capsys, options, match):
    args = [*pair, "--descriptor", "sift", "--out", tmp_path / "m.png", *options]
    _assert_one_error(*run(args, capsys), match)
    assert not list(tmp_path.iterdir())


def test_module_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "exemplar_desc.viewer", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "m.png")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr == f"error: IMG1 '{tmp_path / 'a.png'}': no such file\n"
