"""File formats of the SfM pipeline: hloc HDF5 layout, uint8 quantisation, COLMAP text export, matcher."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
import torch

from exemplar_desc.registry import create_descriptor
from exemplar_desc.quantization import quantize_uint8
from exemplar_desc.formats.colmap import colmap_descriptors, export_colmap_text, to_colmap_keypoints
from exemplar_desc.extraction import extract_features
from exemplar_desc.formats.hloc import pair_key
from exemplar_desc.sfm.pair_matching import match_pairs
from exemplar_desc.sfm.pairs import make_pairs, parse_pairs_spec

from .synth import write_views

NAMES = ["a.png", "sub/b.png", "sub/c.png"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    images = root / "images"
    write_views(images, NAMES, size=(300, 400))
    features = root / "features.h5"
    result = extract_features(images, NAMES, {"rootsift": create_descriptor("rootsift")}, {"rootsift": features},
                              max_size=200, max_keypoints=500)
    pairs = make_pairs(NAMES, "exhaustive")
    counts = match_pairs(features, pairs, root / "matches.h5", ratio=None)
    return root, features, result, pairs, counts


def test_features_h5_layout(extracted):
    root, features, result, _, _ = extracted
    assert result.names == NAMES and not result.skipped
    with h5py.File(features, "r") as f:
        assert f.attrs["complete"] and f.attrs["descriptor"] == "rootsift"
        assert "sub" in f and isinstance(f["sub"], h5py.Group)  # '/' in a name nests groups, as hloc does
        for name in NAMES:
            g = f[name]
            n = g["keypoints"].shape[0]
            assert 50 < n <= 500
            assert g["keypoints"].shape == (n, 2) and g["keypoints"].dtype == np.float32
            assert g["descriptors"].shape == (128, n) and g["descriptors"].dtype == np.float32  # transposed
            assert g["scores"].shape == (n,) and g["scales"].shape == (n,) and g["oris"].shape == (n,)
            assert tuple(g["image_size"][()]) == (400, 300)  # (W, H) of the original
            np.testing.assert_allclose(np.linalg.norm(g["descriptors"][()], axis=0), 1.0, atol=1e-5)
            kp = g["keypoints"][()]
            # Extraction ran at half resolution (200 px) but keypoints are in original pixels.
            assert kp[:, 0].max() > 250 and kp[:, 0].max() < 400 and kp[:, 1].max() < 300
    assert not (root / "features.h5.tmp").exists()


def test_keypoints_scaled_with_pixel_centre_convention(tmp_path):
    image = cv2.imread(str(write_views(tmp_path, ["x.png"], size=(300, 400))[0]), cv2.IMREAD_GRAYSCALE)
    small = cv2.resize(image, (200, 150), interpolation=cv2.INTER_AREA)
    kps = cv2.SIFT_create(nfeatures=300).detect(small, None)
    out = tmp_path / "f.h5"
    extract_features(tmp_path, ["x.png"], {"sift": create_descriptor("sift")}, {"sift": out}, max_size=200, max_keypoints=300)
    with h5py.File(out, "r") as f:
        stored = f["x.png"]["keypoints"][()]
        sizes = f["x.png"]["scales"][()]
    expected = (np.array([k.pt for k in kps]) + 0.5) * 2.0 - 0.5
    np.testing.assert_allclose(np.sort(stored[:, 0]), np.sort(expected[:, 0]), atol=1e-3)
    np.testing.assert_allclose(np.sort(sizes), np.sort([2 * k.size for k in kps]), rtol=1e-5)


def test_matches_h5_layout(extracted):
    root, features, _, pairs, counts = extracted
    assert pairs == [("a.png", "sub/b.png"), ("a.png", "sub/c.png"), ("sub/b.png", "sub/c.png")]
    with h5py.File(features, "r") as f, h5py.File(root / "matches.h5", "r") as m:
        assert m.attrs["complete"]
        assert set(m.keys()) == {"a.png", "sub-b.png"}
        assert pair_key("sub/b.png", "sub/c.png") == "sub-b.png/sub-c.png"
        for name0, name1 in pairs:
            g = m[pair_key(name0, name1)]
            n0, n1 = f[name0]["keypoints"].shape[0], f[name1]["keypoints"].shape[0]
            m0, s0 = g["matches0"][()], g["matching_scores0"][()]
            assert m0.shape == (n0,) and s0.shape == (n0,)
            assert np.issubdtype(m0.dtype, np.integer) and s0.dtype == np.float32
            assert m0.min() >= -1 and m0.max() < n1
            valid = m0 >= 0
            assert counts[(name0, name1)] == valid.sum() > 20
            assert len(np.unique(m0[valid])) == valid.sum()  # mutual NN: one-to-one
            assert np.all(s0[~valid] == 0) and np.all(s0[valid] > 0.5)
            # The views are shifted copies: matched keypoints differ by the known shift.
            shift = 24 * (NAMES.index(name1) - NAMES.index(name0))
            d = f[name0]["keypoints"][()][valid] - f[name1]["keypoints"][()][m0[valid]]
            assert np.mean(np.all(np.abs(d - shift) < 2.0, axis=1)) > 0.8


def test_pairs_specs():
    names = [f"{i}.jpg" for i in range(5)]
    assert len(make_pairs(names, "exhaustive")) == 10
    assert make_pairs(names, "sequential:2") == [
        ("0.jpg", "1.jpg"), ("0.jpg", "2.jpg"), ("1.jpg", "2.jpg"), ("1.jpg", "3.jpg"),
        ("2.jpg", "3.jpg"), ("2.jpg", "4.jpg"), ("3.jpg", "4.jpg"),
    ]
    for bad in ("sequential", "sequential:0", "sequential:x", "all"):
        with pytest.raises(ValueError, match="^pairs "):
            parse_pairs_spec(bad)


def test_quantize_uint8_is_colmap_sift_quantisation():
    desc = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]], np.float32)
    q = quantize_uint8(desc)
    assert q.dtype == np.uint8 and q.shape == (3, 4)
    # 512 * (0.6, 0.8) = (307.2, 409.6) -> clipped to 255; zero rows stay zero; negatives -> 0.
    np.testing.assert_array_equal(q, [[255, 255, 0, 0], [0, 0, 0, 0], [255, 0, 0, 0]])
    noise = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (128, 128)).astype(np.uint8), (0, 0), 2)
    sift = cv2.SIFT_create().detectAndCompute(noise, None)[1]
    unit = sift / np.linalg.norm(sift, axis=1, keepdims=True)
    np.testing.assert_array_equal(quantize_uint8(sift), np.minimum(np.round(512 * unit), 255).astype(np.uint8))
    assert quantize_uint8(sift).max() < 255  # SIFT's 0.2 clipping keeps unit components below 0.5
    np.testing.assert_array_equal(colmap_descriptors(sift, "rootsift"), quantize_uint8(sift))
    signed = colmap_descriptors(desc[:1], "exemplar:exemplar-fast")
    np.testing.assert_array_equal(signed, quantize_uint8(desc[:1], signed=True))
    assert signed.min() >= 1  # the signed encoding keeps negative components


def test_colmap_text_export(extracted, tmp_path):
    _, features, _, _, _ = extracted
    written = export_colmap_text(features, tmp_path / "txt")
    assert sorted(p.relative_to(tmp_path / "txt").as_posix() for p in written) == [f"{n}.txt" for n in sorted(NAMES)]
    lines = (tmp_path / "txt" / "sub" / "b.png.txt").read_text().splitlines()
    with h5py.File(features, "r") as f:
        g = f["sub/b.png"]
        n = g["keypoints"].shape[0]
        assert lines[0] == f"{n} 128" and len(lines) == n + 1
        first = lines[1].split()
        assert len(first) == 132
        np.testing.assert_allclose([float(v) for v in first[:2]], g["keypoints"][0] + 0.5, atol=1e-3)
        assert float(first[2]) == pytest.approx(g["scales"][0] / 2, abs=1e-3)
        assert [int(v) for v in first[4:]] == quantize_uint8(g["descriptors"][()].T[:1])[0].tolist()


def test_to_colmap_keypoints_offsets_and_units():
    rows = to_colmap_keypoints(np.array([[0.0, 0.0], [10.0, 5.0]]), np.array([4.0, 2.0]), np.array([90.0, -1.0]))
    np.testing.assert_allclose(rows, [[0.5, 0.5, 2.0, np.pi / 2], [10.5, 5.5, 1.0, 0.0]], rtol=1e-6)
