"""The held-out validation sequences: deterministic, every kind, held-out photos only, right homographies."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from benchmarks.datasets import load_sequences, sequence_kind
from benchmarks.synthetic import _warp
from benchmarks.validation import (
    HELD_OUT_FOLDERS,
    VALIDATION_KINDS,
    ensure_sequences,
    ensure_validation_dataset,
    held_out_photos,
    kinds_in_turn,
    sequence_name,
)
from exemplar_desc.images import decode_bgr

from ..conftest import shared_data

# Photos 0-2 and 27-29 of the 42: one sequence of every kind, from both held-out folders.
SUBSET = ["kodak24/kodim01.jpg", "kodak24/kodim02.jpg", "kodak24/kodim03.jpg",
          "mcmaster/12.jpg", "mcmaster/13.jpg", "mcmaster/14.jpg"]


@pytest.fixture(scope="module")
def train_root():
    return shared_data("train")


@pytest.fixture(scope="module")
def generated(train_root, tmp_path_factory):
    """The subset's sequences generated twice, into two caches."""
    return [ensure_validation_dataset(train_root, tmp_path_factory.mktemp(f"cache{i}"), SUBSET) for i in range(2)]


@pytest.fixture(scope="module")
def sequences(generated):
    """{kind: (BGR float32 images, homographies)} of the first generation."""
    loaded, errors = load_sequences(generated[0])
    assert not errors
    return {s.kind: ([cv2.imread(str(p)).astype(np.float32) for p in s.paths], s.homographies) for s in loaded}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_generations_are_byte_identical(generated):
    first, second = (_files(root) for root in generated)
    assert len(first) == len(SUBSET) * 11  # img1..img6 and H1to2p..H1to6p per sequence
    assert first == second


def test_every_kind_is_present_by_folder_name(generated, train_root):
    names = sorted(p.name for p in generated[0].iterdir())
    assert sorted(sequence_kind(n) for n in names) == sorted(VALIDATION_KINDS)
    photos = held_out_photos(train_root)  # kinds in turn over all 42, so a subset keeps its photos' kinds
    assert names == sorted(sequence_name(p, VALIDATION_KINDS[photos.index(p) % len(VALIDATION_KINDS)]) for p in SUBSET)


def test_held_out_photos_are_the_two_folders_only(train_root):
    photos = held_out_photos(train_root)
    assert (train_root / "bsds300").is_dir()  # there are other folders to leave out
    assert len(photos) == 42 and {p.split("/")[0] for p in photos} == set(HELD_OUT_FOLDERS)


def test_image_1_is_the_held_out_photo_itself(generated, train_root):
    by_name = {sequence_name(photo, kind): photo for photo in SUBSET for kind in VALIDATION_KINDS}
    for folder in generated[0].iterdir():
        photo = decode_bgr((train_root / by_name[folder.name]).read_bytes())
        assert np.array_equal(cv2.imread(str(folder / "img1.ppm")), photo)
        assert cv2.imread(str(folder / "img6.ppm")).shape == photo.shape


def test_only_held_out_folders_are_used(tmp_path):
    rng = np.random.default_rng(0)
    for folder in (*HELD_OUT_FOLDERS, "bsds300", "t91"):
        (tmp_path / "train" / folder).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / "train" / folder / f"p{i}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    root = ensure_validation_dataset(tmp_path / "train", tmp_path / "cache")
    assert sorted(p.name for p in root.iterdir()) == sorted(
        sequence_name(p, VALIDATION_KINDS[i]) for i, p in enumerate(held_out_photos(tmp_path / "train")))
    assert len(list(root.iterdir())) == 2 * len(HELD_OUT_FOLDERS)
    (tmp_path / "train" / "mcmaster" / "p0.png").unlink()
    (tmp_path / "train" / "mcmaster" / "p1.png").unlink()
    with pytest.raises(ValueError, match="no images"):
        held_out_photos(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match="kodak24"):
        held_out_photos(tmp_path / "train" / "bsds300")



def test_any_photos_make_sequences_and_the_validation_set_is_one_case(tmp_path):
    rng = np.random.default_rng(0)
    for folder in HELD_OUT_FOLDERS:
        (tmp_path / "train" / folder).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / "train" / folder / f"p{i}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    validation = ensure_validation_dataset(tmp_path / "train", tmp_path / "a")
    plan = kinds_in_turn(held_out_photos(tmp_path / "train"))
    same = ensure_sequences(tmp_path / "train", plan, tmp_path / "b")
    assert same.name == validation.name and _files(same) == _files(validation)  # same cache key, same bytes
    smaller = ensure_sequences(tmp_path / "train", plan, tmp_path / "b", max_side=32)
    assert smaller.name != same.name  # the size is in the cache key
    assert all(cv2.imread(str(path)).shape == (24, 32, 3) for path in smaller.rglob("img*.ppm"))
    with pytest.raises(ValueError, match="share a name"):
        ensure_sequences(tmp_path / "train", [("kodak24/p0.png", "blur"), ("kodak24/p0.png", "blur")], tmp_path / "c")


def _valid(shape, H, margin=9):
    """Where image k shows image 1's content, ``margin`` px inside the border."""
    inside = _warp(np.ones(shape[:2], np.float32), H)
    return cv2.erode(inside, np.ones((margin, margin), np.uint8)) > 0.5


def _shift(warped, image, valid):
    """Median (x, y) shift in px of ``image`` against ``warped`` over square tiles around a 3x3
    grid of points (those wholly in ``valid``), each by ECC alignment (translation) of the
    images smoothed alike; ECC is blind to gain and offset, and the median to textureless tiles."""
    a, b = (cv2.GaussianBlur(x.astype(np.float32), (0, 0), 2.0) for x in (warped, image))
    h, w = valid.shape
    r = min(h, w) // 8
    shifts = []
    for y in (h // 4, h // 2, 3 * h // 4):
        for x in (w // 4, w // 2, 3 * w // 4):
            sl = (slice(y - r, y + r), slice(x - r, x + r))
            if valid[sl].all():
                _, M = cv2.findTransformECC(np.ascontiguousarray(a[sl]), np.ascontiguousarray(b[sl]),
                                            np.eye(2, 3, dtype=np.float32), cv2.MOTION_TRANSLATION,
                                            (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5), None, 5)
                shifts.append(M[:, 2])
    assert shifts, "no tile inside the valid region"
    return np.median(shifts, axis=0)


def test_geometric_homographies_reproduce_image_k(sequences):
    for kind in ("viewpoint", "zoom+rotation"):
        images, homographies = sequences[kind]
        for k in range(1, 6):
            valid = _valid(images[0].shape, homographies[k])
            error = np.abs(_warp(images[0], homographies[k]) - images[k])[valid].mean()
            assert error < 3.0, (kind, k, error)  # sensor noise of about 2 grey levels, nothing else


def test_homographies_put_the_content_in_place_for_every_kind(sequences):
    errors = {}
    for kind, (images, homographies) in sequences.items():
        for k in range(1, 6):
            valid = _valid(images[0].shape, homographies[k])
            warped = _warp(images[0], homographies[k])
            shift = _shift(cv2.cvtColor(warped, cv2.COLOR_BGR2GRAY), cv2.cvtColor(images[k], cv2.COLOR_BGR2GRAY), valid)
            assert np.abs(shift).max() < 0.4, (kind, k, shift)
            errors[kind, k] = np.abs(warped - images[k])[valid].mean()
    worst_geometric = max(e for (kind, _), e in errors.items() if kind in ("viewpoint", "zoom+rotation"))
    for kind in ("light", "noise", "JPEG", "blur"):  # the strongest change is visible in the pixels
        assert errors[kind, 5] > 1.5 * worst_geometric, (kind, errors[kind, 5], worst_geometric)


def test_a_wrong_homography_is_caught(sequences):
    images, homographies = sequences["blur"]
    wrong = np.array([[1, 0, 1.5], [0, 1, 0], [0, 0, 1]]) @ homographies[5]
    shift = _shift(cv2.cvtColor(_warp(images[0], wrong), cv2.COLOR_BGR2GRAY), cv2.cvtColor(images[5], cv2.COLOR_BGR2GRAY),
                   _valid(images[0].shape, homographies[5]))
    assert abs(shift[0] + 1.5) < 0.3 and abs(shift[1]) < 0.3, shift


def _block_log_ratios(images, homographies, k, blocks=5):
    """(n, 3) log ratio of image k's mean BGR to warped image 1's, per block of a 5x5 grid."""
    warped, valid = _warp(images[0], homographies[k]), _valid(images[0].shape, homographies[k])
    h, w = valid.shape
    out = []
    for i in range(blocks):
        for j in range(blocks):
            sl = (slice(i * h // blocks, (i + 1) * h // blocks), slice(j * w // blocks, (j + 1) * w // blocks))
            if valid[sl].mean() > 0.5:
                out.append(np.log((images[k][sl][valid[sl]].mean(0) + 1) / (warped[sl][valid[sl]].mean(0) + 1)))
    return np.array(out)


def test_light_changes_brightness_and_colour_non_uniformly(sequences):
    light = _block_log_ratios(*sequences["light"], k=5)
    still = _block_log_ratios(*sequences["viewpoint"], k=5)
    assert light.mean(axis=1).std() > 0.1 > 10 * still.mean(axis=1).std()  # shading and shadows vary across the image
    assert abs((light[:, 2] - light[:, 0]).mean()) > 0.2  # colour temperature: red against blue
    assert abs((still[:, 2] - still[:, 0]).mean()) < 0.02
