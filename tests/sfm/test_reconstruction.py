"""End-to-end reconstruction of a few real, downscaled photos (../shared/data/sfm)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest

from exemplar_desc.sfm.__main__ import main
from exemplar_desc.sfm.reconstruction import observation_sigma

from ..conftest import SHARED_DATA

DATA = SHARED_DATA / "sfm" / "sceaux_castle"
NAMES = ["100_7100.JPG", "100_7101.JPG", "100_7102.JPG", "100_7103.JPG"]

pytestmark = pytest.mark.skipif(
    not all((DATA / n).is_file() for n in NAMES), reason=f"SfM test photos not found in {DATA} (../shared is absent)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sceaux")
    images = root / "images"
    images.mkdir()
    for name in NAMES:  # link, never copy, the shared data
        (images / name).symlink_to(DATA / name)
    out = root / "out"
    argv = ["--images", str(images), "--out", str(out), "--descriptor", "sift", "--max-size", "800",
            "--max-keypoints", "4000", "--export-colmap"]
    code = main(argv)
    return images, out, argv, code


def test_registers_all_images(run, capsys):
    _, out, _, code = run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_registered"] == 4 and summary["num_models"] == 1 and summary["verified_pairs"] == 6
    assert summary["images_not_registered"] == []
    assert summary["points3D"] > 500
    assert 2.0 < summary["mean_track_length"] < 4.0 + 1e-9
    assert 0.0 < summary["mean_reprojection_error"] < 1.5
    assert set(summary["seconds"]) == {"features", "matching", "database", "verification", "mapping", "total"}
    rec = pycolmap.Reconstruction(out / "sparse" / "0")  # COLMAP binary model
    assert sorted(rec.images[i].name for i in rec.reg_image_ids()) == NAMES
    assert rec.num_points3D() == summary["points3D"]
    # The EXIF focal length (2865 px) seeds the camera; bundle adjustment stays near the true 2905.88 px
    # (two passes: 3027 px here; at --max-size 640 the four images gave 3053 px, +5.1 %).
    focal = [cam.focal_length for cam in rec.cameras.values()]
    assert len(focal) == 1 and abs(focal[0] - 2905.88) / 2905.88 < 0.05


def test_observation_sigma_recovers_the_keypoint_noise(run):
    # Observations moved to their exact projections plus Gaussian noise of a known sigma,
    # then bundle-adjusted: the residuals' plain RMS per coordinate understates the noise
    # (BA absorbs part of it into the points and poses), the estimate recovers it.
    _, out, _, _ = run
    rec = pycolmap.Reconstruction(out / "sparse" / "0")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["observation_sigma"] == pytest.approx(observation_sigma(rec), rel=1e-6)
    assert summary["models"][0]["observation_sigma"] == summary["observation_sigma"]
    sigma, rng = 0.7, np.random.default_rng(0)
    for image_id in rec.reg_image_ids():
        image, camera = rec.images[image_id], rec.cameras[rec.images[image_id].camera_id]
        for point in image.points2D:
            if point.has_point3D():
                exact = camera.img_from_cam(image.cam_from_world() * rec.points3D[point.point3D_id].xyz)
                point.xy = exact + rng.normal(0.0, sigma, 2)
    pycolmap.bundle_adjustment(rec)
    squares = [np.sum((camera.img_from_cam(image.cam_from_world() * rec.points3D[p.point3D_id].xyz) - p.xy) ** 2)
               for image in (rec.images[i] for i in rec.reg_image_ids())
               for camera in [rec.cameras[image.camera_id]]
               for p in image.points2D if p.has_point3D()]
    assert np.sqrt(np.mean(squares) / 2) < 0.85 * sigma
    assert observation_sigma(rec) == pytest.approx(sigma, rel=0.03)


def test_database_uses_colmap_pixel_convention(run):
    _, out, _, _ = run
    with pycolmap.Database.open(out / "database.db") as db, h5py.File(out / "features.h5", "r") as f:
        assert db.num_images() == 4 and db.num_verified_image_pairs() == 6
        image = db.read_image_with_name(NAMES[0])
        kps = db.read_keypoints(image.image_id)
        np.testing.assert_allclose(kps[:, :2], f[NAMES[0]]["keypoints"][()] + 0.5, atol=1e-4)
        assert db.read_descriptors(image.image_id).data.shape == (len(kps), 128)
    lines = (out / "colmap_features" / f"{NAMES[0]}.txt").read_text().splitlines()
    assert lines[0] == f"{len(kps)} 128"


def test_rerun_reuses_features_and_reproduces(run, capsys):
    _, out, argv, _ = run
    first = json.loads((out / "summary.json").read_text())
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 with reused features" in printed
    second = json.loads((out / "summary.json").read_text())
    assert second["images_reused"] == 4 and second["images_registered"] == first["images_registered"] == 4
    assert not list(out.glob("*.tmp"))


def test_focal_length_overrides_the_exif_prior(run, tmp_path):
    from exemplar_desc.sfm.reconstruction import build_database

    images, out, _, _ = run
    pairs = [tuple(line.split()) for line in (out / "pairs.txt").read_text().splitlines()]
    ids = build_database(tmp_path / "db.db", images, NAMES, out / "features.h5", out / "matches.h5", pairs, focal_length=2000.0)
    assert sorted(ids) == sorted(NAMES)
    with pycolmap.Database.open(tmp_path / "db.db") as db:
        cameras = db.read_all_cameras()
    assert len(cameras) == 1 and cameras[0].focal_length == 2000.0 and cameras[0].has_prior_focal_length


def test_seeded_verification_is_repeatable(run, tmp_path):
    from exemplar_desc.sfm.reconstruction import verify_pairs

    _, out, _, _ = run
    inliers = []
    for i in range(2):
        db = tmp_path / f"copy{i}.db"
        db.write_bytes((out / "database.db").read_bytes())
        with pycolmap.Database.open(db) as d:
            d.clear_two_view_geometries()
        verify_pairs(db, out / "pairs.txt", seed=0)
        with pycolmap.Database.open(db) as d:
            pair_ids, counts = d.read_two_view_geometry_num_inliers()
        inliers.append(dict(zip(map(int, pair_ids), map(int, counts))))
    assert len(inliers[0]) == 6 and inliers[0] == inliers[1]


def test_two_pass_mapping_refines_the_distortion(run, tmp_path):
    """The default second pass recovers Sceaux's barrel distortion, as a single COLMAP pass does."""
    from exemplar_desc.sfm.reconstruction import MapperSettings, run_mapper

    images, out, _, _ = run
    distortion = {}
    for two_pass in (True, False):
        sparse = tmp_path / f"sparse-{two_pass}"
        models = run_mapper(out / "database.db", images, sparse, MapperSettings(two_pass=two_pass))
        assert len(models) == 1 and models[0].num_reg_images() == 4
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(sparse.name)) == [sparse.name]
        (camera,) = pycolmap.Reconstruction(sparse / "0").cameras.values()
        distortion[two_pass] = camera.params[3]  # SIMPLE_RADIAL: f, cx, cy, k
    assert distortion[True] < -0.1 and abs(distortion[True] - distortion[False]) < 0.02
