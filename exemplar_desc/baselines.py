"""SIFT and RootSIFT with the same Feature2D-style interface as ExemplarDescriptor.

Used as references by the matching benchmark and the SfM pipeline; RootSIFT is
Arandjelovic & Zisserman (CVPR 2012): L1-normalise, square root, which makes the
Euclidean distance a Hellinger kernel on the SIFT histograms.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .cli import OptionError, check
from .descriptor import ExemplarDescriptor
from .model_io import resolve_card_path

__all__ = ["Float128Descriptor", "RootSIFT", "create_descriptor", "check_descriptor_name", "is_exemplar", "DESCRIPTOR_NAMES"]

DESCRIPTOR_NAMES = ("exemplar", "sift", "rootsift")


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


def create_descriptor(name: str, device: str = "cpu", **kwargs):
    """Build a descriptor by name.

    Args:
        name: ``"sift"`` (OpenCV SIFT), ``"rootsift"``, ``"exemplar"`` (the shipped default
            model) or ``"exemplar:<model>"`` (a shipped model name or a weights path).
        device: torch device for the Exemplar models.
        kwargs: passed to the constructor (e.g. ``nfeatures`` for SIFT's detector).

    Returns:
        An object with OpenCV's Feature2D methods (detect, compute, detectAndCompute, ...).
    """
    if name == "sift":
        return cv2.SIFT_create(**kwargs)
    if name == "rootsift":
        return RootSIFT(**kwargs)
    if is_exemplar(name):
        model = name.split(":", 1)[1] if ":" in name else None
        return ExemplarDescriptor(model=model, device=device, **kwargs)
    raise ValueError(f"unknown descriptor {name!r}; available: {', '.join(DESCRIPTOR_NAMES)} or exemplar:<model>")


def is_exemplar(name: str) -> bool:
    """Whether a descriptor name of :func:`create_descriptor` is an Exemplar model (``exemplar`` or ``exemplar:<model>``)."""
    return name == "exemplar" or name.startswith("exemplar:")


def check_descriptor_name(option: str, name: str) -> None:
    """Check a name for :func:`create_descriptor` without building anything: ``sift``,
    ``rootsift``, ``exemplar`` or ``exemplar:<model>`` with a shipped model name or a
    card/weights path that exists.

    Raises:
        OptionError: naming ``option`` (e.g. ``"--compare"``), the name and what is allowed.
    """
    allowed = f"must be {', '.join(DESCRIPTOR_NAMES)} or exemplar:<model>"
    check(isinstance(name, str) and bool(name), option, name, allowed)
    if name.startswith("exemplar:"):
        try:
            resolve_card_path(name.split(":", 1)[1])
        except FileNotFoundError as err:
            raise OptionError(option, name, str(err)) from None
    else:
        check(name in DESCRIPTOR_NAMES, option, name, allowed)
