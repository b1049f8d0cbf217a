"""uint8 encodings of float descriptors, for COLMAP and other byte-based tools.

COLMAP stores 128 bytes per keypoint and its matchers compare descriptors by dot product,
assuming every encoded vector has the same norm (as SIFT's do: unit vector x 512).

* Non-negative descriptors (SIFT, RootSIFT): COLMAP's own rule, ``round(512 x unit)``
  clipped to [0, 255].
* Signed descriptors (the Exemplar PCA descriptors): centred (mean component removed),
  renormalised and offset, ``round(128 + 127 x unit_centred)``, which never leaves
  [1, 255]. Every encoded vector then has the same norm, so COLMAP's dot-product matching
  ranks candidates exactly as the Euclidean distance between the centred float
  descriptors does, and ``cv2.NORM_L2`` on the bytes is 127x that distance up to rounding.
  SIFT's rule would instead zero every negative component.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantize_uint8"]


def quantize_uint8(desc: np.ndarray, signed: bool = False) -> np.ndarray:
    """Encode (N, D) float descriptors as (N, D) uint8 (see the module docstring).

    Args:
        desc: (N, D) float descriptors, any scale; all-zero rows stay at the encoding of zero.
        signed: use the centred, offset encoding for descriptors with negative components.

    Raises:
        ValueError: not 2-D, or non-finite values.
    """
    desc = np.asarray(desc, dtype=np.float32)
    if desc.ndim != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {desc.shape}")
    if not np.all(np.isfinite(desc)):
        raise ValueError("descriptors contain NaN or infinite values")
    if signed:
        desc = desc - desc.mean(axis=1, keepdims=True)
    unit = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    if signed:
        return np.round(128.0 + 127.0 * unit).astype(np.uint8)
    return np.clip(np.round(512.0 * unit), 0, 255).astype(np.uint8)
