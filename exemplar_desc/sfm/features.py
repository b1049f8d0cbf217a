"""Detect and describe the images of an SfM run into hloc-layout HDF5 feature files.

Layout of ``features.h5`` (readable as is by hloc's matchers and reconstruction): one group
per image, named by its path relative to the image folder (``/`` in a name makes nested
groups, as in hloc), holding

- ``keypoints`` (N, 2) float32: (x, y) in ORIGINAL-resolution pixels, pixel centres at
  integer coordinates (OpenCV's and hloc's convention; COLMAP's adds 0.5);
- ``descriptors`` (D, N) float32, TRANSPOSED, each column L2-normalised;
- ``scores`` (N,) float32: the detector's response;
- ``image_size`` (2,) int32: (W, H) of the original image;
- ``scales`` (N,) float32: ``KeyPoint.size`` (diameter) in original-resolution pixels;
- ``oris`` (N,) float32: ``KeyPoint.angle`` in degrees, clockwise in image coordinates.

Keypoints are found once per image by OpenCV's SIFT (DoG) detector on the image
downscaled to ``max_size``, and every descriptor describes the same keypoints, so runs
with different descriptors compare descriptors only.

Re-runs: each group records the image file's SHA-1, the descriptor name, its identity (an
Exemplar model's weights hash and patch magnification) and the extraction settings; an
image whose record matches is copied from the previous file instead of being processed
again. Files are written to ``<name>.tmp`` and moved into
place with ``os.replace`` after the root attribute ``complete`` is set, so an interrupted
run never leaves a partial file under the final name.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from ..images import UnreadableImageError, decode_gray, read_image_bytes, resize_to_max

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURES_FORMAT",
    "OutputConflictError",
    "ExtractionResult",
    "check_feature_file",
    "extract_features",
]

FEATURES_FORMAT = "exemplar_desc.sfm.features/1"
DETECTOR = "opencv-sift-dog"


class OutputConflictError(RuntimeError):
    """An existing output file belongs to another descriptor or to another program."""


@dataclass
class ExtractionResult:
    """What :func:`extract_features` did.

    Attributes:
        names: images now in the feature files, in input order.
        skipped: unreadable images, name -> reason.
        reused: images copied from the previous files (all descriptors up to date).
        num_keypoints: descriptor name -> image name -> number of keypoints.
    """

    names: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    num_keypoints: dict[str, dict[str, int]] = field(default_factory=dict)


def check_feature_file(path: str | Path, descriptor_name: str) -> bool:
    """Tell whether an existing feature file can be reused (and later replaced) by this run.

    Returns:
        True if ``path`` is a complete file of this format for ``descriptor_name``; False if
        it does not exist or is an incomplete file of this format (it will be rebuilt).

    Raises:
        OutputConflictError: the file holds another descriptor's features, or was not
            written by this module (it is left untouched).
    """
    path = Path(path)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as err:
        raise OutputConflictError(f"{path} exists but is not an HDF5 file ({err}); choose another --out") from err
    if attrs.get("format") != FEATURES_FORMAT:
        raise OutputConflictError(
            f"{path} was not written by exemplar_desc.sfm (no format tag); choose another --out "
            "or pass --overwrite to replace it"
        )
    if attrs.get("descriptor") != descriptor_name:
        raise OutputConflictError(
            f"{path} holds features of descriptor {attrs.get('descriptor')!r}, not {descriptor_name!r}; "
            "choose another --out or pass --overwrite to replace them"
        )
    if not attrs.get("complete", False):
        logger.warning("%s is incomplete (interrupted run); rebuilding it", path)
        return False
    return True


def _identity(descriptor: Any) -> str:
    """What distinguishes two extractors of one name: an Exemplar model's weights and patch geometry."""
    card = getattr(descriptor, "card", None)
    if card is not None:
        return f"sha256 {card['sha256']}, magnification {descriptor.magnification:g}, upright {descriptor.upright}"
    return f"{type(descriptor).__name__}, OpenCV {cv2.__version__}"


def _settings(descriptor_name: str, descriptor: Any, max_size: int | None, max_keypoints: int) -> dict[str, Any]:
    return {
        "descriptor": descriptor_name,
        "descriptor_identity": _identity(descriptor),
        "detector": DETECTOR,
        "max_size": int(max_size or 0),
        "max_keypoints": int(max_keypoints),
    }


def _reusable(old: h5py.File | None, name: str, sha1: str, settings: Mapping[str, Any]) -> bool:
    if old is None or name not in old:
        return False
    attrs = old[name].attrs
    return attrs.get("sha1") == sha1 and all(attrs.get(k) == v for k, v in settings.items())


def _describe(
    descriptor: Any, image: np.ndarray, keypoints: Sequence[cv2.KeyPoint], scale: np.ndarray
) -> dict[str, np.ndarray]:
    """Describe keypoints found on the processed image; return hloc datasets in original pixels."""
    dim = int(descriptor.descriptorSize())
    kps, desc = descriptor.compute(image, keypoints) if len(keypoints) else ((), None)
    if desc is None or len(kps) == 0:
        kps, desc = (), np.zeros((0, dim), np.float32)
    desc = np.asarray(desc, dtype=np.float32).reshape(len(kps), dim)
    desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    xy = np.array([kp.pt for kp in kps], dtype=np.float64).reshape(-1, 2)
    return {
        "keypoints": ((xy + 0.5) / scale - 0.5).astype(np.float32),
        "descriptors": np.ascontiguousarray(desc.T),
        "scores": np.array([kp.response for kp in kps], dtype=np.float32),
        "scales": (np.array([kp.size for kp in kps], dtype=np.float64) / scale.mean()).astype(np.float32),
        "oris": np.array([kp.angle for kp in kps], dtype=np.float32),
    }


def _process_image(
    image_dir: Path,
    name: str,
    descriptors: Mapping[str, Any],
    olds: Mapping[str, h5py.File | None],
    news: Mapping[str, h5py.File],
    detector: cv2.Feature2D,
    max_size: int | None,
    settings: Mapping[str, Mapping[str, Any]],
    result: ExtractionResult,
) -> None:
    """Copy one image's groups from the old files or extract them; record what happened in ``result``.

    ``settings`` maps each descriptor name to its :func:`_settings` record.
    """
    try:
        data, sha1 = read_image_bytes(image_dir / name)
    except OSError as err:
        result.skipped[name] = f"cannot read file: {err}"
        logger.warning("skipping %s: %s", name, result.skipped[name])
        return
    todo = [d for d in descriptors if not _reusable(olds[d], name, sha1, settings[d])]
    if todo:
        try:
            full = decode_gray(data, name)
        except UnreadableImageError as err:
            result.skipped[name] = str(err)
            logger.warning("skipping %s", err)
            return
        image, scale = resize_to_max(full, max_size)
        # Deterministic, so descriptors extracted now and copied ones share keypoints.
        keypoints = detector.detect(image, None)
        image_size = np.array([full.shape[1], full.shape[0]], dtype=np.int32)
    else:
        result.reused.append(name)
    for dname, out in news.items():
        if dname in todo:
            group = out.create_group(name)
            for key, value in _describe(descriptors[dname], image, keypoints, scale).items():
                group.create_dataset(key, data=value)
            group.create_dataset("image_size", data=image_size)
            group.attrs.update({"sha1": sha1, **settings[dname]})
        else:
            olds[dname].copy(olds[dname][name], out, name=name)
        result.num_keypoints[dname][name] = int(out[name]["keypoints"].shape[0])
    result.names.append(name)


def extract_features(
    image_dir: str | Path,
    names: Sequence[str],
    descriptors: Mapping[str, Any],
    feature_paths: Mapping[str, str | Path],
    max_size: int | None = None,
    max_keypoints: int = 8192,
    reuse: bool = True,
) -> ExtractionResult:
    """Detect keypoints once per image and describe them with each descriptor.

    Args:
        image_dir: folder the names are relative to.
        names: image names (relative paths with ``/``).
        descriptors: descriptor name (as given to ``create_descriptor``) -> object with
            OpenCV Feature2D's ``compute`` and ``descriptorSize``.
        feature_paths: descriptor name -> output ``features.h5`` path (same keys).
        max_size: longer image side, in pixels, for detection and description (None: full
            resolution); keypoints are stored in original-resolution pixels.
        max_keypoints: the detector's limit per image (strongest kept).
        reuse: copy unchanged images from existing complete files of the same descriptor.

    Returns:
        An :class:`ExtractionResult`. Unreadable images are skipped, logged and listed.

    Raises:
        OutputConflictError: an existing file belongs to another descriptor or program
            (pass ``reuse=False`` to replace it).
    """
    if set(descriptors) != set(feature_paths):
        raise ValueError("descriptors and feature_paths must have the same keys")
    detector = cv2.SIFT_create(nfeatures=max_keypoints)
    settings = {d: _settings(d, descriptors[d], max_size, max_keypoints) for d in descriptors}
    result = ExtractionResult(num_keypoints={d: {} for d in descriptors})
    tmp_paths = {d: Path(str(p) + ".tmp") for d, p in feature_paths.items()}
    try:
        with ExitStack() as stack:
            olds: dict[str, h5py.File | None] = {}
            news: dict[str, h5py.File] = {}
            for dname, path in feature_paths.items():
                keep = check_feature_file(path, dname) if reuse else False
                olds[dname] = stack.enter_context(h5py.File(path, "r")) if keep else None
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                news[dname] = stack.enter_context(h5py.File(tmp_paths[dname], "w"))
                news[dname].attrs.update(
                    {"format": FEATURES_FORMAT, "complete": False, **settings[dname]}
                )
            for name in tqdm(names, desc="features", unit="img"):
                _process_image(Path(image_dir), name, descriptors, olds, news, detector, max_size, settings, result)
            for out in news.values():
                out.attrs["complete"] = True
    except BaseException:
        for tmp in tmp_paths.values():
            tmp.unlink(missing_ok=True)
        raise
    for dname, path in feature_paths.items():
        os.replace(tmp_paths[dname], path)
    return result

