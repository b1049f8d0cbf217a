"""Sequence loaders on both layouts, bad input, and the synthetic generator's homographies."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.datasets import SequenceError, load_sequence, load_sequences, read_homography, sequence_kind, write_sequence
from benchmarks.metrics import project
from benchmarks.synthetic import SYNTHETIC_SEQUENCES, ensure_synthetic_dataset, make_sequence

from ..conftest import SHARED_DATA

OXFORD = SHARED_DATA / "oxford"


def _image(seed, shape=(40, 50)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write(folder: Path, layout: str, n: int = 3, ext: str = ".png", scale: float = 1.0):
    folder.mkdir(parents=True)
    for k in range(1, n + 1):
        image = np.dstack([_image(k)] * 3) if ext in (".ppm", ".jpg") else _image(k)  # .ppm is colour only
        assert cv2.imwrite(str(folder / (f"img{k}{ext}" if layout == "oxford" else f"{k}{ext}")), image)
        if k > 1:
            H = np.array([[1, 0, k], [0, 1, 0], [0, 0, 1]], dtype=float) * scale
            np.savetxt(folder / (f"H1to{k}p" if layout == "oxford" else f"H_1_{k}"), H)
    return folder


@pytest.mark.parametrize("layout,ext", [("oxford", ".ppm"), ("oxford", ".pgm"), ("hpatches", ".png"), ("hpatches", ".jpg")])
def test_both_layouts_load(tmp_path, layout, ext):
    seq = load_sequence(_write(tmp_path / "v_test", layout, n=4, ext=ext, scale=2.0))
    assert len(seq.images) == 4 and seq.images[0].dtype == np.uint8 and seq.images[0].ndim == 2
    assert seq.pairs == ["1-2", "1-3", "1-4"]
    assert seq.kind == "viewpoint"
    # normalised by H[2,2]: the file held 2 * [[1,0,k],[0,1,0],[0,0,1]]
    np.testing.assert_allclose(seq.homographies[2], [[1, 0, 3], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(seq.homographies[0], np.eye(3))


@pytest.mark.parametrize("text, message", [
    ("1 0 0\n0 nan 0\n0 0 1\n", "contains non-finite values"),
    ("1 0 0\n0 1 inf\n0 0 1\n", "contains non-finite values"),
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n", "expected a 3x3 matrix of numbers, got shape (3, 4)"),
])
def test_bad_homography_says_what_is_wrong_and_names_the_file(tmp_path, text, message):
    folder = _write(tmp_path / "seq", "oxford")
    (folder / "H1to2p").write_text(text)
    with pytest.raises(SequenceError) as info:
        load_sequence(folder)
    assert str(info.value).startswith(f"{folder / 'H1to2p'}: ") and message in str(info.value)


def test_bad_sequences_are_reported_and_others_still_load(tmp_path):
    _write(tmp_path / "good", "oxford")
    _write(tmp_path / "nohomography", "oxford")
    (tmp_path / "nohomography" / "H1to3p").unlink()
    _write(tmp_path / "singular", "hpatches")
    np.savetxt(tmp_path / "singular" / "H_1_2", np.array([[1, 2, 0], [2, 4, 0], [0, 0, 1.0]]))
    _write(tmp_path / "unreadable", "oxford")
    (tmp_path / "unreadable" / "img2.png").write_bytes(b"not an image")
    _write(tmp_path / "single", "oxford", n=1)
    _write(tmp_path / "badtext", "oxford")
    (tmp_path / "badtext" / "H1to2p").write_text("1 2 3\n4 5\n")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "gap", "oxford", n=4)
    (tmp_path / "gap" / "img3.png").unlink()
    sequences, errors = load_sequences(tmp_path)
    assert [s.name for s in sequences] == ["good"]
    assert set(errors) == {"nohomography", "singular", "unreadable", "single", "badtext", "empty", "gap"}
    assert "img3" in errors["gap"] and "missing image" in errors["gap"]
    assert "H1to3p" in errors["nohomography"] and "missing" in errors["nohomography"]
    assert "H_1_2" in errors["singular"] and "singular" in errors["singular"]
    assert "img2.png" in errors["unreadable"]
    assert "at least two images" in errors["single"]
    assert "H1to2p" in errors["badtext"]
    assert "no first image" in errors["empty"]


def test_one_sequence_folder_is_accepted_as_data(tmp_path):
    folder = _write(tmp_path / "graf", "oxford")
    sequences, errors = load_sequences(folder)
    assert [s.name for s in sequences] == ["graf"] and sequences[0].kind == "viewpoint" and not errors
    with pytest.raises(FileNotFoundError):
        load_sequences(tmp_path / "absent")


def test_kinds_from_names():
    assert [sequence_kind(n) for n in ["bikes", "bark", "leuven", "ubc", "i_dome", "rocket-zoom-rotation", "chelsea-jpeg", "x"]] == [
        "blur", "zoom+rotation", "light", "JPEG", "light", "zoom+rotation", "JPEG", "other"]


def test_write_sequence_round_trip(tmp_path):
    images = [_image(1, (30, 40)), np.dstack([_image(2, (30, 40))] * 3)]
    H = np.array([[2.0, 0.2, 4.0], [0.0, 2.0, 2.0], [0.002, 0.0, 2.0]])
    folder = write_sequence(tmp_path / "seq", images, [np.eye(3), H])
    assert sorted(p.name for p in folder.iterdir()) == ["H1to2p", "img1.pgm", "img2.ppm"]
    seq = load_sequence(folder)
    np.testing.assert_allclose(seq.homographies[1], H / 2.0, rtol=1e-9)
    assert np.array_equal(seq.images[0], images[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _blob_image(points, shape=(240, 320)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.full(shape, 20.0)
    for x, y in points:
        image += 220 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["viewpoint", "zoom+rotation", "blur", "light", "JPEG"])
def test_synthetic_homographies_move_points_where_the_image_content_goes(kind):
    points = np.array([[130.0, 100.0], [190.0, 140.0], [150.0, 150.0], [175.0, 95.0]])
    images, homographies = make_sequence(_blob_image(points), kind, seed=3)
    assert len(images) == len(homographies) == 6
    for k in range(1, 6):
        assert images[k].shape == images[0].shape and images[k].dtype == np.uint8
        image = images[k].astype(np.float64)
        for p in project(homographies[k], points):
            x0, y0 = np.rint(p).astype(int)
            win = image[y0 - 7 : y0 + 8, x0 - 7 : x0 + 8]
            win = np.maximum(win - np.median(image), 0) ** 2
            yy, xx = np.mgrid[y0 - 7 : y0 + 8, x0 - 7 : x0 + 8]
            centroid = np.array([(win * xx).sum(), (win * yy).sum()]) / win.sum()
            assert np.linalg.norm(centroid - p) < 0.75, (kind, k, p, centroid)
    if kind == "viewpoint":  # increasingly strong: the foreshortening grows with k
        widths = [np.ptp(project(H, [[0, 120], [319, 120]])[:, 0]) for H in homographies]
        assert all(a > b for a, b in zip(widths, widths[1:]))


def test_synthetic_dataset_is_written_and_read_back(tmp_path):
    root = ensure_synthetic_dataset(tmp_path)
    sequences, errors = load_sequences(root)
    assert not errors
    assert {s.name for s in sequences} == set(SYNTHETIC_SEQUENCES)
    assert {s.kind for s in sequences} == {"viewpoint", "zoom+rotation", "blur", "light", "JPEG"}
    first = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    ensure_synthetic_dataset(tmp_path)  # complete: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in root.rglob("*")} == first


@pytest.mark.skipif(not OXFORD.is_dir(), reason=f"Oxford sequences not found at {OXFORD} (CI has them at <repo>/../shared/data)")
def test_real_oxford_sequences_load():
    sequences, errors = load_sequences(OXFORD)
    assert not errors
    names = {s.name: s for s in sequences}
    assert {"graf", "wall", "bikes", "trees"} <= set(names)
    assert names["graf"].kind == "viewpoint" and names["bikes"].kind == "blur"
    assert len(names["graf"].images) == 6
    assert read_homography(OXFORD / "graf" / "H1to2p")[2, 2] == 1.0
