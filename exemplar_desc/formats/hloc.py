"""hloc's HDF5 files, ``features.h5`` and ``matches.h5``: layout, writing, reading, merging.

:mod:`exemplar_desc.extraction` writes the feature files (``python -m exemplar_desc.extract``
and the SfM command), :mod:`exemplar_desc.sfm.pair_matching` the match files; hloc's matchers
and reconstruction read both as they are.

Layout of ``features.h5``: one group per image, named by its path relative to the image
folder (``/`` in a name makes nested groups, as in hloc), holding

- ``keypoints`` (N, 2) float32: (x, y) in ORIGINAL-resolution pixels, pixel centres at
  integer coordinates (OpenCV's and hloc's convention; COLMAP's adds 0.5); its attribute
  ``uncertainty`` is the detection noise in original pixels as hloc writes it (1 px on the
  processed image for DoG, times the mean resize factor original / processed);
- ``descriptors`` (D, N) float32, TRANSPOSED, each column L2-normalised;
- ``scores`` (N,) float32: the detector's response;
- ``image_size`` (2,) int32: (W, H) of the original image;
- ``scales`` (N,) float32: ``KeyPoint.size`` (diameter) in original-resolution pixels;
- ``oris`` (N,) float32: ``KeyPoint.angle`` in degrees, clockwise in image coordinates.

Each group's attributes record how it was made: the image file's ``sha1`` and the
extraction settings (``descriptor``, ``descriptor_identity``, ``detector``, ``max_size``,
``max_keypoints``), which are also the file's root attributes, beside ``format``
(:data:`FEATURES_FORMAT`).

Layout of ``matches.h5``: one group per pair named by :func:`pair_key`, holding
``matches0`` (N0,) int32 (index into image 1's keypoints, -1 = unmatched) and
``matching_scores0`` (N0,) float32 (cosine similarity of the matched descriptors, 0 where
unmatched), as hloc's nearest-neighbour matcher writes them; root attributes ``format``
(:data:`MATCHES_FORMAT`), ``ratio`` (0: none) and ``mutual``.

Both files carry the root attribute ``complete``: False while written, True once finished;
a file is written under a temporary name and moved into place in one step. Part files (the
ranks of a torchrun job write one each) are put together by :func:`merge_parts`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import h5py
import numpy as np

from ..atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURES_FORMAT",
    "MATCHES_FORMAT",
    "OutputConflictError",
    "check_feature_file",
    "feature_datasets",
    "write_features",
    "read_descriptors",
    "pair_key",
    "write_matches",
    "read_matches",
    "merge_parts",
]

FEATURES_FORMAT = "exemplar_desc.sfm.features/1"
MATCHES_FORMAT = "exemplar_desc.sfm.matches/1"


class OutputConflictError(RuntimeError):
    """An existing output file belongs to another descriptor or to another program; the message
    ends by suggesting another output or overwriting it (a command line adds its flag)."""


def check_feature_file(path: str | Path, descriptor_name: str) -> bool:
    """Tell whether an existing feature file can be reused (and later replaced) by this run.

    Returns:
        True if ``path`` is a complete file of this format for ``descriptor_name``; False if
        it does not exist or is an incomplete file of this format (it will be rebuilt).

    Raises:
        OutputConflictError: the file holds another descriptor's features, or was not
            written by this package (it is left untouched).
    """
    path = Path(path)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as err:
        raise OutputConflictError(f"{path} exists but is not an HDF5 file ({err}); choose another output or overwrite it") from err
    if attrs.get("format") != FEATURES_FORMAT:
        raise OutputConflictError(
            f"{path} was not written by exemplar_desc.sfm or exemplar_desc.extract (no format tag); choose "
            "another output or overwrite it"
        )
    if attrs.get("descriptor") != descriptor_name:
        raise OutputConflictError(
            f"{path} holds features of descriptor {attrs.get('descriptor')!r}, not {descriptor_name!r}; "
            "choose another output or overwrite it"
        )
    if not attrs.get("complete", False):
        logger.warning("%s is incomplete (interrupted run); rebuilding it", path)
        return False
    return True


def feature_datasets(keypoints: Sequence[cv2.KeyPoint], descriptors: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """One image's datasets of ``features.h5`` (but ``image_size``) from OpenCV's keypoints and descriptors.

    Args:
        keypoints: found on the processed (resized) image.
        descriptors: (N, D) float32 of ``keypoints``; each row is L2-normalised here.
        scale: (2,) processed pixels per original pixel along (x, y).

    Returns:
        ``keypoints``, ``descriptors``, ``scores``, ``scales``, ``oris`` in the file's layout
        (original pixels, descriptors transposed).
    """
    descriptors = descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float64).reshape(-1, 2)
    return {
        "keypoints": ((xy + 0.5) / scale - 0.5).astype(np.float32),
        "descriptors": np.ascontiguousarray(descriptors.T),
        "scores": np.array([kp.response for kp in keypoints], dtype=np.float32),
        "scales": (np.array([kp.size for kp in keypoints], dtype=np.float64) / scale.mean()).astype(np.float32),
        "oris": np.array([kp.angle for kp in keypoints], dtype=np.float32),
    }


def write_features(
    out: h5py.File,
    name: str,
    datasets: Mapping[str, np.ndarray],
    image_size: np.ndarray,
    scale: np.ndarray,
    attrs: Mapping[str, Any],
) -> None:
    """Write one image's group into an open ``features.h5``.

    Args:
        datasets: from :func:`feature_datasets`.
        image_size: (2,) int32 (W, H) of the original image.
        scale: (2,) processed pixels per original pixel along (x, y).
        attrs: the group's record (``sha1`` and the extraction settings).
    """
    group = out.create_group(name)
    for key, value in datasets.items():
        group.create_dataset(key, data=value)
    group.create_dataset("image_size", data=image_size)
    # hloc: detection noise (1 processed pixel for DoG) x mean resize factor.
    group["keypoints"].attrs["uncertainty"] = float(np.mean(1.0 / scale))
    group.attrs.update(attrs)


def read_descriptors(features: h5py.File, name: str) -> np.ndarray:
    """(N, D) descriptors of image ``name`` (the file holds them transposed)."""
    return features[name]["descriptors"][()].T


def pair_key(name0: str, name1: str) -> str:
    """HDF5 group of a pair in hloc's match files: ``name0.replace('/', '-') + '/' + name1.replace('/', '-')``."""
    return name0.replace("/", "-") + "/" + name1.replace("/", "-")


def write_matches(out: h5py.File, name0: str, name1: str, matches0: np.ndarray, scores0: np.ndarray) -> None:
    """Write one pair's group into an open ``matches.h5``.

    Args:
        matches0: (N0,) index into image 1's keypoints for each of image 0's, -1 = unmatched.
        scores0: (N0,) cosine similarity of the matched descriptors, 0 where unmatched.
    """
    group = out.require_group(pair_key(name0, name1))
    group.create_dataset("matches0", data=np.asarray(matches0).astype(np.int32))
    group.create_dataset("matching_scores0", data=np.asarray(scores0).astype(np.float32))


def read_matches(matches: h5py.File, name0: str, name1: str) -> np.ndarray:
    """(M, 2) uint32 keypoint indices (in image 0, in image 1) of a pair's matches."""
    m0 = matches[pair_key(name0, name1)]["matches0"][()]
    idx0 = np.nonzero(m0 >= 0)[0]
    return np.stack([idx0, m0[idx0]], axis=1).astype(np.uint32)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and np.array_equal(a, b)


def merge_parts(parts: Sequence[str | Path], out_path: str | Path, keys: Sequence[str]) -> None:
    """Copy the objects named by ``keys`` from complete part files into one file, in that order.

    The merged file holds the same groups, datasets and attributes, and the same root
    attributes, as one process writes for all of them.

    Args:
        parts: HDF5 files whose root attribute ``complete`` is True and whose other root
            attributes are equal (e.g. ``format`` and the extraction settings); they become
            the merged file's.
        out_path: the merged file (replaced atomically).
        keys: paths of the objects to copy (``"img.jpg"``, ``"dir/img.jpg"``,
            ``"a.jpg/b.jpg"``), each held by exactly one part; a group is copied with its
            datasets, subgroups and attributes; groups above it are created as needed.

    Raises:
        ValueError: a part is incomplete, or its root attributes differ from the first
            part's, or a key is held by no part or by several.
    """
    if not parts:
        raise ValueError("no part files to merge")
    with ExitStack() as stack:
        files = [stack.enter_context(h5py.File(part, "r")) for part in parts]
        attrs = [dict(f.attrs) for f in files]
        for part, part_attrs in zip(parts, attrs):
            if not _same(part_attrs.get("complete"), np.True_):
                raise ValueError(f"{part} is incomplete (its writer was interrupted or failed); it cannot be merged")
            if part_attrs.keys() != attrs[0].keys() or not all(_same(v, attrs[0][k]) for k, v in part_attrs.items()):
                raise ValueError(f"{part} and {parts[0]} were written with different settings: {part_attrs} vs {attrs[0]}")
        sources = []
        for key in keys:
            holders = [f for f in files if key in f]
            if len(holders) != 1:
                raise ValueError(f"{key!r} is in {len(holders)} of the part files {[str(p) for p in parts]}; expected one")
            sources.append(holders[0])

        def write(tmp: str) -> None:
            with h5py.File(tmp, "w") as out:
                out.attrs.update({**attrs[0], "complete": False})
                for key, source in zip(keys, sources):
                    source.copy(source[key], out, name=key)
                out.attrs["complete"] = True

        atomic_write(out_path, write)
    logger.info("merged %d objects of %d part files into %s", len(keys), len(parts), out_path)
