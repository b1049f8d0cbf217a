"""The descriptors the benchmark compares, built by name.

Every descriptor is an object with OpenCV's ``compute(image, keypoints) -> (keypoints,
descriptors)``. Names:

* ``exemplar:<model>`` for every model shipped in ``weights/`` (``exemplar_desc.model_io``);
* ``sift``, ``rootsift`` (:mod:`exemplar_desc.baselines`);
* kornia patch descriptors on 32x32 grey patches of side ``magnification`` x
  ``KeyPoint.size`` (:data:`PATCH_MAGNIFICATION`, MKD's :data:`MKD_MAGNIFICATION`), cut by
  :func:`exemplar_desc.patches.extract_patches`: ``kornia:sift`` (SIFTDescriptor, no
  weights), ``tfeat``, ``hardnet``, ``sosnet``, ``hynet`` and ``mkd`` (MKDDescriptor: concat
  kernels, its ``pcawt`` whitening learned on Liberty, 128-D), whose pretrained weights load
  through torch hub's cache, ``$TORCH_HOME/hub/checkpoints``;
* ``xfeatures2d:daisy``, ``xfeatures2d:vgg``, ``xfeatures2d:boostdesc`` when OpenCV's
  contrib build is installed.

A descriptor that cannot be built (no shipped model, weights not downloadable, no contrib
build) is reported as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from exemplar_desc.baselines import Float128Descriptor
from exemplar_desc.registry import create_descriptor, is_exemplar
from exemplar_desc.model_io import DEFAULT_MODEL, list_models
from exemplar_desc.patches import build_pyramid, extract_patches, keypoint_frames, keypoints_to_arrays, to_gray_float

logger = logging.getLogger(__name__)

__all__ = ["PATCH_MAGNIFICATION", "MKD_MAGNIFICATION", "KorniaPatchDescriptor", "catalogue", "build_descriptors",
           "as_float"]

PATCH_SIZE = 32  # side in pixels of the patches the kornia descriptors get
PATCH_MAGNIFICATION = 16.0  # patch side in units of KeyPoint.size for the kornia descriptors but MKD (not tuned)
#: MKD's patch side in units of KeyPoint.size, chosen on the validation set by the rule of
#: docs/model-development.md (the highest mAP whose MMA@3 is within 0.5 points of the best):
#: ``python -m benchmarks.matching --validation ../shared/data/train --descriptors mkd --magnification M``
#: gave mAP / MMA@3 (%) 73.0 / 74.6 at 10, 73.5 / 74.2 at 12, 73.3 / 73.7 at 14, 72.6 / 73.5 at 16.
MKD_MAGNIFICATION = 12.0


@dataclass(frozen=True)
class _KorniaPeer:
    """A ``kornia.feature`` class, the arguments that load its pretrained weights, and its magnification."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=lambda: {"pretrained": True})
    magnification: float = PATCH_MAGNIFICATION


_KORNIA_MODELS = {
    "kornia:sift": _KorniaPeer("SIFTDescriptor", {"patch_size": PATCH_SIZE, "rootsift": False}),
    "tfeat": _KorniaPeer("TFeat"),
    "hardnet": _KorniaPeer("HardNet"),
    "sosnet": _KorniaPeer("SOSNet"),
    "hynet": _KorniaPeer("HyNet"),
    "mkd": _KorniaPeer("MKDDescriptor", {"patch_size": PATCH_SIZE, "kernel_type": "concat", "whitening": "pcawt",
                                         "training_set": "liberty", "output_dims": 128}, MKD_MAGNIFICATION),
}
_CONTRIB = {"xfeatures2d:daisy": "DAISY_create", "xfeatures2d:vgg": "VGG_create", "xfeatures2d:boostdesc": "BoostDesc_create"}


class KorniaPatchDescriptor(Float128Descriptor):
    """A kornia patch network as an OpenCV-style descriptor.

    Patches of side ``magnification * KeyPoint.size`` pixels, oriented by ``KeyPoint.angle``,
    are cut from an anti-aliased pyramid of the grey image in [0, 1] and resampled to
    ``PATCH_SIZE`` x ``PATCH_SIZE`` (32x32);
    the network gets them unchanged (the kornia models standardise their input themselves).
    """

    def __init__(self, module: torch.nn.Module, name: str, magnification: float = PATCH_MAGNIFICATION,
                 device: str = "cpu", batch_size: int = 1024) -> None:
        self.module = module.to(device).eval()
        self.name = name
        self.magnification = magnification
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def compute(self, image: np.ndarray, keypoints: Sequence[cv2.KeyPoint]) -> tuple[list[cv2.KeyPoint], np.ndarray]:
        """Describe ``keypoints`` of ``image`` (grey or BGR, see ``to_gray_float``).

        Returns:
            The keypoints unchanged (as a list) and (N, D) float32 descriptors.
        """
        xy, size, angle = keypoints_to_arrays(keypoints)
        frames = keypoint_frames(size, angle, self.magnification)
        patches = extract_patches(build_pyramid(to_gray_float(image)), xy, frames, PATCH_SIZE)
        out = [self.module(patches[s : s + self.batch_size].to(self.device)).cpu()
               for s in range(0, len(patches), self.batch_size)]
        desc = torch.cat(out).numpy() if out else np.zeros((0, self.descriptorSize()), np.float32)
        return list(keypoints), np.ascontiguousarray(desc, dtype=np.float32)

    def getDefaultName(self) -> str:
        return f"Feature2D.kornia.{self.name}"


def _exemplar_models() -> tuple[list[str], str | None]:
    """Shipped Exemplar model names, the default model first, or the reason there are none."""
    try:
        models = sorted(list_models(), key=lambda m: m != DEFAULT_MODEL)
    except Exception as err:  # a broken weights folder must not stop the other descriptors
        return [], f"no shipped model found (list_models failed: {type(err).__name__}: {err})"
    return models, None if models else "no shipped model found in weights/"


def catalogue() -> tuple[list[str], dict[str, str]]:
    """All descriptor names the benchmark knows, and the reasons some cannot run here.

    Returns:
        Names in display order, and ``{name: reason}`` for names known to be unavailable
        without trying to build them (a missing Exemplar model, no OpenCV contrib build).
        Peers whose weights must be fetched are only found missing by :func:`build_descriptors`.
    """
    models, reason = _exemplar_models()
    names = [f"exemplar:{m}" for m in models] or ["exemplar"]
    unavailable = {"exemplar": reason} if reason else {}
    names += ["sift", "rootsift", *_KORNIA_MODELS, *_CONTRIB]
    if not hasattr(cv2, "xfeatures2d"):
        for name in _CONTRIB:
            unavailable[name] = "OpenCV contrib build not installed (cv2.xfeatures2d missing)"
    return names, unavailable


def _build(name: str, device: str, magnification: float | None, **exemplar_options):
    """One descriptor by name; ``magnification`` None: the Exemplar card's or the kornia peer's own."""
    if is_exemplar(name):
        return create_descriptor(name, device=device, magnification=magnification, **exemplar_options)
    if name in ("sift", "rootsift"):
        return create_descriptor(name, device=device)
    import kornia.feature as KF

    if name not in _KORNIA_MODELS:
        return getattr(cv2.xfeatures2d, _CONTRIB[name])()
    peer = _KORNIA_MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch hub's retry warnings; the failure itself is reported
        module = getattr(KF, peer.cls)(**peer.kwargs)
    magnification = peer.magnification if magnification is None else magnification
    return KorniaPatchDescriptor(module, peer.cls, magnification, device=device)


def build_descriptors(
    names: Sequence[str] | None = None, device: str = "cpu", magnification: float | None = None, **exemplar_options
) -> tuple[dict[str, object], dict[str, str]]:
    """Build descriptors by name.

    Args:
        names: names from :func:`catalogue` (``exemplar:<path or model>`` is accepted too);
            ``None`` means all of them.
        device: torch device for the network descriptors.
        magnification: patch side / ``KeyPoint.size`` of the Exemplar models and the kornia patch
            descriptors (``None``: each card's, each peer's own).
        exemplar_options: more :class:`ExemplarDescriptor` arguments (``precision``, ``batch_size``).

    Returns:
        ``{name: descriptor}`` for those that could be built, and ``{name: reason}`` for
        the others.

    Raises:
        ValueError: an unknown name; the message lists the available ones.
    """
    known, skipped = catalogue()
    wanted = list(known) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in known and not is_exemplar(n)]
    if unknown:
        raise ValueError(f"unknown descriptor(s) {', '.join(unknown)}; available: {', '.join(known)}")
    built, reasons = {}, {}
    for name in wanted:
        if name in skipped:
            reasons[name] = skipped[name]
            continue
        try:
            built[name] = _build(name, device, magnification, **exemplar_options)
        except Exception as err:  # a peer that cannot load is reported, not fatal
            reasons[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            logger.info("descriptor %s skipped: %s", name, reasons[name])
    return built, reasons


def as_float(descriptors: np.ndarray | None, norm: int, count: int) -> np.ndarray:
    """Descriptors as (N, D) float32 for L2 matching; binary (Hamming) ones are unpacked to bits.

    For unpacked bits the squared L2 distance equals the Hamming distance, so nearest
    neighbours are the same as with ``cv2.NORM_HAMMING``.
    """
    if descriptors is None:
        return np.zeros((count, 0), np.float32)
    if norm in (cv2.NORM_HAMMING, cv2.NORM_HAMMING2) and descriptors.dtype == np.uint8:
        return np.unpackbits(descriptors, axis=1).astype(np.float32)
    return np.ascontiguousarray(descriptors, dtype=np.float32)
