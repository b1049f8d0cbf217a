"""COLMAP's side of the features: uint8 descriptors, keypoint rows, feature-import text files.

:func:`colmap_descriptors` picks the encoding of :func:`exemplar_desc.quantization.quantize_uint8`
for a descriptor; the COLMAP database and the text export both use it.

Text format read by ``colmap feature_importer --import_path DIR``: for image ``NAME`` the
file ``DIR/NAME.txt`` holds a header line ``NUM_FEATURES 128`` and then one line per
feature, ``X Y SCALE ORIENTATION D1 ... D128``, with X, Y in COLMAP's pixel convention
(the top-left pixel's centre at (0.5, 0.5)), SCALE in pixels, ORIENTATION in radians and
D1..D128 integers in 0..255.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from ..atomic import atomic_write
from ..quantization import quantize_uint8
from .hloc import read_descriptors

logger = logging.getLogger(__name__)

__all__ = ["COLMAP_DESCRIPTOR_DIM", "colmap_descriptors", "to_colmap_keypoints", "export_colmap_text"]

COLMAP_DESCRIPTOR_DIM = 128  # COLMAP's feature files and SIFT matchers take 128 bytes per keypoint


def colmap_descriptors(desc: np.ndarray, descriptor_name: str) -> np.ndarray:
    """(N, 128) float descriptors as COLMAP's bytes: SIFT's rule for SIFT/RootSIFT, the
    constant-norm signed encoding for the Exemplar descriptors (see :mod:`exemplar_desc.quantization`)."""
    return quantize_uint8(desc, signed=descriptor_name.startswith("exemplar"))


def to_colmap_keypoints(keypoints: np.ndarray, scales: np.ndarray | None = None, oris: np.ndarray | None = None) -> np.ndarray:
    """Convert hloc-file keypoints to COLMAP's 4-column keypoint rows.

    Args:
        keypoints: (N, 2) (x, y), pixel centres at integers (OpenCV/hloc convention).
        scales: (N,) OpenCV ``KeyPoint.size`` (diameter) in pixels, or None (-> 1).
        oris: (N,) OpenCV ``KeyPoint.angle`` in degrees (-1 = none), or None (-> 0).

    Returns:
        (N, 4) float32 rows (x + 0.5, y + 0.5, scale, orientation): scale is the radius
        ``size / 2`` in pixels (SIFT's sigma-like scale), orientation in radians.
    """
    n = len(keypoints)
    out = np.empty((n, 4), dtype=np.float32)
    out[:, :2] = np.asarray(keypoints, dtype=np.float32).reshape(n, 2) + 0.5
    out[:, 2] = 1.0 if scales is None else np.asarray(scales, dtype=np.float32) / 2.0
    angle = np.zeros(n, np.float32) if oris is None else np.asarray(oris, dtype=np.float32)
    out[:, 3] = np.deg2rad(np.where(angle < 0, 0.0, angle))
    return out


def _write_import_file(path: str, rows: np.ndarray) -> None:
    with open(path, "w") as fh:
        fh.write(f"{len(rows)} {COLMAP_DESCRIPTOR_DIM}\n")
        np.savetxt(fh, rows, fmt=["%.4f"] * 4 + ["%d"] * COLMAP_DESCRIPTOR_DIM, delimiter=" ")


def export_colmap_text(features_path: str | Path, out_dir: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Write one COLMAP feature-import text file per image of an hloc feature file.

    Args:
        features_path: ``features.h5`` (:mod:`.hloc`'s layout) with 128-D descriptors.
        out_dir: folder for ``<image name>.txt`` files (sub-folders follow the names); give
            it to ``colmap feature_importer --import_path``.
        names: images to export (default: all in the file).

    Returns:
        The written paths. Each file is written to a temporary sibling and renamed when complete.
    """
    out_dir = Path(out_dir)
    written = []
    with h5py.File(features_path, "r") as f:
        descriptor_name = str(f.attrs.get("descriptor", ""))
        if names is None:
            names = []
            f.visititems(lambda key, obj: names.append(key) if isinstance(obj, h5py.Group) and "keypoints" in obj else None)
        for name in names:
            group = f[name]
            desc = read_descriptors(f, name)
            if desc.shape[1] != COLMAP_DESCRIPTOR_DIM:
                raise ValueError(f"COLMAP's importer needs {COLMAP_DESCRIPTOR_DIM}-D descriptors; {name} has {desc.shape[1]}")
            kps = to_colmap_keypoints(
                group["keypoints"][()],
                group["scales"][()] if "scales" in group else None,
                group["oris"][()] if "oris" in group else None,
            )
            rows = np.concatenate([kps.astype(np.float64), colmap_descriptors(desc, descriptor_name).astype(np.float64)], axis=1)
            path = out_dir / f"{name}.txt"
            atomic_write(path, lambda tmp: _write_import_file(tmp, rows))
            written.append(path)
    logger.info("wrote %d COLMAP feature files to %s", len(written), out_dir)
    return written
