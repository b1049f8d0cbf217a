"""SIFT and RootSIFT with the same Feature2D-style interface as ExemplarDescriptor.

Built by name through :func:`exemplar_desc.registry.create_descriptor`; RootSIFT is
Arandjelovic & Zisserman (CVPR 2012): L1-normalise, square root, which makes the
Euclidean distance a Hellinger kernel on the SIFT histograms.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


__all__ = ["Float128Descriptor", "RootSIFT"]


class Float128Descriptor:
    """Feature2D's descriptor properties for 128-D float32 descriptors compared by L2 distance."""

    def descriptorSize(self) -> int:
        return 128

    def descriptorType(self) -> int:
        return cv2.CV_32F

    def defaultNorm(self) -> int:
        return cv2.NORM_L2


class RootSIFT(Float128Descriptor):
    """OpenCV SIFT followed by the RootSIFT mapping; descriptors (N, 128) float32, unit L2 norm."""

    def __init__(self, **sift_kwargs) -> None:
        self._sift = cv2.SIFT_create(**sift_kwargs)

    @staticmethod
    def _root(desc: np.ndarray | None) -> np.ndarray | None:
        if desc is None:
            return None
        desc = desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12)
        return np.sqrt(desc).astype(np.float32)

    def detect(self, image: np.ndarray, mask: np.ndarray | None = None) -> Sequence[cv2.KeyPoint]:
        return self._sift.detect(image, mask)

    def compute(self, image: np.ndarray, keypoints: Sequence[cv2.KeyPoint]):
        kps, desc = self._sift.compute(image, keypoints)
        return kps, self._root(desc)

    def detectAndCompute(self, image: np.ndarray, mask: np.ndarray | None = None, useProvidedKeypoints: bool = False):
        kps, desc = self._sift.detectAndCompute(image, mask, useProvidedKeypoints=useProvidedKeypoints)
        return kps, self._root(desc)

    def getDefaultName(self) -> str:
        return "Feature2D.RootSIFT"
