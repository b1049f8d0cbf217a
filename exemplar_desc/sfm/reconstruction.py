"""COLMAP reconstruction from hloc feature and match files, through pycolmap (4.x).

Steps: a COLMAP database with cameras, trivial rigs and frames (COLMAP >= 3.12 needs them),
images, keypoints (shifted by COLMAP's +0.5 pixel offset), uint8 descriptors (128-D only,
quantised by :func:`exemplar_desc.formats.colmap.colmap_descriptors`) and the raw matches; geometric
verification of the listed pairs (two-view geometries); incremental mapping, in two passes
by default (see :class:`MapperSettings`); statistics of every model the mapper made.

Cameras: ``SIMPLE_RADIAL`` with the focal length from the image's EXIF data when present
(COLMAP's own reader), otherwise COLMAP's default prior (1.2 x the longer side). Images
whose inferred cameras are identical (same size and prior) share one camera, so a folder
of photos without EXIF data gets one shared camera.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pycolmap

from ..checks import check, check_number
from ..formats.colmap import colmap_descriptors, to_colmap_keypoints
from ..formats.hloc import read_descriptors, read_matches

logger = logging.getLogger(__name__)

__all__ = [
    "SfmError",
    "MapperSettings",
    "build_database",
    "remove_database_files",
    "verify_pairs",
    "run_mapper",
    "observation_sigma",
    "model_statistics",
]


class SfmError(RuntimeError):
    """The input cannot give a reconstruction (no images, a single image, ...); the message says why."""


@dataclass
class MapperSettings:
    """Incremental mapper options exposed on the CLI (COLMAP's defaults in brackets).

    Attributes:
        min_model_size: smallest model kept, in registered images [10].
        init_min_num_inliers: verified inliers an initial pair needs [100].
        abs_pose_min_num_inliers: 2D-3D inliers to register a further image [30].
        min_num_matches: verified matches for a pair to be used at all [15].
        multiple_models: keep starting new models after the first one stops growing [True].
        two_pass: map first with the radial distortion held at its prior (0), then continue
            the largest model with it refined [False: refined from the first image pair on].
            In a model of a few images the distortion is barely constrained and can run
            away and stall the reconstruction; the second pass still recovers a real distortion
            (docs/sfm.md, "Two-pass mapping").
        seed: random seed of COLMAP's RANSAC and mapper (-1: not seeded).
        num_threads: -1 for all cores. Bundle adjustment sums in thread order, so only a single
            thread makes a seeded run exactly repeatable (on Lund, SIFT's models differed between
            runs of the same seed with all cores).
    """

    min_model_size: int = 3
    init_min_num_inliers: int = 50
    abs_pose_min_num_inliers: int = 30
    min_num_matches: int = 15
    multiple_models: bool = True
    two_pass: bool = True
    seed: int = 0
    num_threads: int = -1

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`exemplar_desc.checks.OptionError` (a ValueError) naming the field of the
        first bad setting."""
        for name in ("min_model_size", "init_min_num_inliers", "abs_pose_min_num_inliers", "min_num_matches"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("seed", self.seed, low=-1, integer=True)
        check_number("num_threads", self.num_threads, integer=True)
        check(self.num_threads == -1 or self.num_threads >= 1, "num_threads", self.num_threads,
              "must be -1 (all cores) or a whole number >= 1")
        for name in ("multiple_models", "two_pass"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False")

    def to_pycolmap(self, refine_distortion: bool = True) -> pycolmap.IncrementalPipelineOptions:
        """The settings as pycolmap's ``IncrementalPipelineOptions`` (for one pass of the mapper)."""
        options = pycolmap.IncrementalPipelineOptions()
        options.ba_refine_extra_params = refine_distortion
        options.mapper.abs_pose_refine_extra_params = refine_distortion
        options.min_model_size = self.min_model_size
        options.min_num_matches = self.min_num_matches
        options.multiple_models = self.multiple_models
        options.random_seed = self.seed
        options.num_threads = self.num_threads
        options.mapper.init_min_num_inliers = self.init_min_num_inliers
        options.mapper.abs_pose_min_num_inliers = self.abs_pose_min_num_inliers
        options.mapper.random_seed = self.seed
        options.triangulation.random_seed = self.seed
        return options


def _camera_key(camera: pycolmap.Camera) -> tuple:
    return (camera.model_name, camera.width, camera.height, tuple(np.round(camera.params, 6)))


def _add_image(
    db: pycolmap.Database,
    cameras: dict[tuple, tuple[int, int]],
    image_dir: Path,
    name: str,
    feats: h5py.File,
    focal_length: float | None,
) -> int:
    """Write one image of the feature file, its camera (shared with identical ones), trivial rig
    and frame, keypoints and (128-D only) descriptors; returns its image id.

    Args:
        cameras: camera key -> (camera id, rig id) of the cameras written so far; updated.
    """
    camera = pycolmap.infer_camera_from_image(image_dir / name)
    if focal_length is not None:  # a known focal length overrides a misleading EXIF prior
        camera.focal_length = focal_length
        camera.has_prior_focal_length = True
    group = feats[name]
    size = tuple(int(v) for v in group["image_size"][()])
    if (camera.width, camera.height) != size:
        raise SfmError(f"{name}: COLMAP reads {camera.width}x{camera.height}, features say {size[0]}x{size[1]}")
    key = _camera_key(camera)
    if key not in cameras:
        new_camera_id = db.write_camera(camera)
        rig = pycolmap.Rig()
        rig.add_ref_sensor(pycolmap.sensor_t(type=pycolmap.SensorType.CAMERA, id=new_camera_id))
        cameras[key] = (new_camera_id, db.write_rig(rig))
    camera_id, rig_id = cameras[key]
    image_id = db.write_image(pycolmap.Image(name=name, camera_id=camera_id))
    frame = pycolmap.Frame()
    frame.rig_id = rig_id
    sensor = pycolmap.sensor_t(type=pycolmap.SensorType.CAMERA, id=camera_id)
    frame.add_data_id(pycolmap.data_t(sensor_id=sensor, id=image_id))
    db.write_frame(frame)
    db.write_keypoints(image_id, to_colmap_keypoints(group["keypoints"][()], group["scales"][()], group["oris"][()]))
    desc = read_descriptors(feats, name)
    if desc.shape[1] == 128:  # COLMAP's matchers expect 128 uint8 values; the mapper needs none
        db.write_descriptors(
            image_id, pycolmap.FeatureDescriptors(
                pycolmap.FeatureExtractorType.SIFT, colmap_descriptors(desc, str(feats.attrs.get("descriptor", "")))
            )
        )
    return image_id


def build_database(
    database_path: str | Path,
    image_dir: str | Path,
    names: Sequence[str],
    features_path: str | Path,
    matches_path: str | Path,
    pairs: Sequence[tuple[str, str]],
    focal_length: float | None = None,
) -> dict[str, int]:
    """Create a fresh COLMAP database from hloc feature and match files.

    The database is built under ``<path>.tmp`` and renamed over ``database_path`` when
    complete.

    Args:
        database_path: output ``.db`` file.
        image_dir: image folder (EXIF data for the cameras).
        names: images to import, all present in the feature file.
        features_path, matches_path: hloc-layout files (see :mod:`exemplar_desc.formats.hloc`).
        pairs: the matched pairs.
        focal_length: focal length prior in pixels of the original images for every camera
            (None: COLMAP's guess from EXIF, else 1.2 x the longer side).

    Returns:
        Image name -> COLMAP image id.

    Raises:
        SfmError: COLMAP reads an image's size differently from the feature file.
    """
    database_path = Path(database_path)
    tmp = Path(str(database_path) + ".tmp")
    remove_database_files(tmp)
    image_ids: dict[str, int] = {}
    try:
        with pycolmap.Database.open(tmp) as db, h5py.File(features_path, "r") as feats:
            cameras: dict[tuple, tuple[int, int]] = {}
            for name in names:
                image_ids[name] = _add_image(db, cameras, Path(image_dir), name, feats, focal_length)
            logger.info("database: %d images, %d cameras", len(image_ids), len(cameras))
            with h5py.File(matches_path, "r") as matches:
                for name0, name1 in pairs:
                    db.write_matches(image_ids[name0], image_ids[name1], read_matches(matches, name0, name1))
    except BaseException:
        remove_database_files(tmp)
        raise
    # SQLite would replay a stale write-ahead log of a crashed earlier run onto the new file.
    remove_database_files(database_path, main_file=False)
    os.replace(tmp, database_path)
    return image_ids


def remove_database_files(path: str | Path, main_file: bool = True) -> None:
    """Remove an SQLite database and its write-ahead log files (``-wal``, ``-shm``); only the
    latter with ``main_file=False``. Missing files are ignored."""
    for suffix in ("", "-wal", "-shm") if main_file else ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def verify_pairs(database_path: str | Path, pairs_path: str | Path, min_num_inliers: int = 15, seed: int = 0) -> int:
    """Run COLMAP's geometric verification (RANSAC E/F/H) on the pairs listed in ``pairs_path``.

    Args:
        seed: RANSAC's random seed (-1: not seeded). COLMAP leaves it unseeded by default,
            which changes inlier counts, and so the mapper's choices, from run to run.

    Returns:
        Number of verified pairs (with a two-view geometry of at least ``min_num_inliers``).
    """
    options = pycolmap.TwoViewGeometryOptions()
    options.min_num_inliers = min_num_inliers
    options.ransac.random_seed = seed
    pycolmap.verify_matches(database_path, pairs_path, options)
    with pycolmap.Database.open(database_path) as db:
        # num_verified_image_pairs() also counts the rejected (degenerate, 0-inlier) pairs.
        pair_ids, _ = db.read_two_view_geometry_num_inliers()
        return len(pair_ids)


def run_mapper(
    database_path: str | Path, image_dir: str | Path, sparse_dir: str | Path, settings: MapperSettings
) -> dict[int, pycolmap.Reconstruction]:
    """Incremental mapping; every model goes to ``sparse_dir/<index>/`` in COLMAP's binary format.

    With ``settings.two_pass`` the second pass continues the largest model of the first (see
    :class:`MapperSettings`); the first pass's models are only logged. ``sparse_dir`` is
    replaced as a whole: everything is written under ``<sparse_dir>.tmp`` first, so a
    failure leaves the previous models in place.

    Returns:
        Model index -> reconstruction (empty if the mapper found no initial pair).
    """
    sparse_dir = Path(sparse_dir)
    tmp = Path(str(sparse_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start_from = ""
    if settings.two_pass:
        (tmp / "first_pass").mkdir(parents=True)
        models = pycolmap.incremental_mapping(
            database_path, image_dir, tmp / "first_pass", settings.to_pycolmap(refine_distortion=False)
        )
        for index, rec in models.items():
            logger.info("first pass, model %d: %d images, %d points", index, rec.num_reg_images(), rec.num_points3D())
        if models:  # without one, the second pass starts from scratch: a plain COLMAP run
            start_from = tmp / "first_pass" / str(max(models, key=lambda i: models[i].num_reg_images()))
    # pycolmap's own output layout differs with and without input_path, so the models are written here.
    (tmp / "pass").mkdir(parents=True)
    models = pycolmap.incremental_mapping(database_path, image_dir, tmp / "pass", settings.to_pycolmap(), input_path=start_from)
    (tmp / "models").mkdir()
    for index, rec in models.items():
        (tmp / "models" / str(index)).mkdir()
        rec.write(tmp / "models" / str(index))  # cameras, images, points3D, rigs, frames .bin
    shutil.rmtree(sparse_dir, ignore_errors=True)
    os.replace(tmp / "models", sparse_dir)
    shutil.rmtree(tmp)
    return dict(models)


def observation_sigma(rec: pycolmap.Reconstruction) -> float | None:
    """Standard deviation of the keypoint positions implied by a model's residuals.

    ``sqrt(sum |r|^2 / (2 n - p))`` over the ``n`` observations, ``r`` the reprojection
    residual (pixels) and ``p`` the parameters bundle adjustment fitted to them (3 per 3D
    point, 6 per registered image, every camera parameter, less the 7 of the similarity
    gauge): the least-squares estimate of the per-coordinate noise of the observations.
    Unlike the mean reprojection error, it does not fall as tracks get shorter: a point
    seen twice absorbs 3 of its 4 coordinates' noise, one seen ten times 3 of 20, so the
    mean error of a model with longer tracks is higher at equal keypoint precision.

    Returns:
        Pixels (per coordinate, original resolution); None when the model has no more
        observations than parameters.
    """
    squares, n = 0.0, 0
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        seen = [p for p in image.points2D if p.has_point3D()]
        if not seen:
            continue
        xyz = np.array([rec.points3D[p.point3D_id].xyz for p in seen])
        projected = rec.cameras[image.camera_id].img_from_cam(image.cam_from_world() * xyz)
        squares += float(((projected - np.array([p.xy for p in seen])) ** 2).sum())
        n += len(seen)
    params = 3 * rec.num_points3D() + 6 * rec.num_reg_images() + sum(len(c.params) for c in rec.cameras.values()) - 7
    return float(np.sqrt(squares / (2 * n - params))) if 2 * n > params else None


def model_statistics(rec: pycolmap.Reconstruction) -> dict[str, Any]:
    """Summary numbers of one model.

    Returns:
        Dict with ``images_registered``, ``points3D``, ``observations``,
        ``mean_track_length`` (observations per 3D point), ``mean_observations_per_image``,
        ``mean_reprojection_error`` (COLMAP's: the mean over 3D points of their tracks'
        mean error; pixels, original resolution), ``observation_sigma``
        (:func:`observation_sigma`, pixels), ``cameras`` and the sorted
        ``registered_images`` names.
    """
    return {
        "images_registered": int(rec.num_reg_images()),
        "points3D": int(rec.num_points3D()),
        "observations": int(rec.compute_num_observations()),
        "mean_track_length": float(rec.compute_mean_track_length()),
        "mean_observations_per_image": float(rec.compute_mean_observations_per_reg_image()),
        "mean_reprojection_error": float(rec.compute_mean_reprojection_error()),
        "observation_sigma": observation_sigma(rec),
        "cameras": int(rec.num_cameras()),
        "registered_images": sorted(rec.images[i].name for i in rec.reg_image_ids()),
    }
