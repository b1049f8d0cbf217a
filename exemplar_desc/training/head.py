"""Fitting the descriptor head (pooling, power, PCA, whitening) of a trained classifier."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ..checks import OptionError
from ..networks import DescriptorNet, ExemplarClassifier
from ..patches import build_pyramid, extract_patches, keypoint_frames, keypoints_to_arrays, normalize_patches
from .config import TrainConfig
from .magnification import read_gray
from .pairs import PAIR_SETTINGS, configured_pairs
from .transforms import SurrogateSampler, sample_patches

logger = logging.getLogger(__name__)

__all__ = ["build_descriptor_net", "fitted_on_photos", "uses_surrogates", "fit_head_on_surrogates", "fit_head_on_keypoints",
           "fit_head_on_pairs", "keypoint_patches"]


@torch.no_grad()
def _pooled(net: DescriptorNet, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(M, F * grid * grid) pooled features of (B, 1, P, P) standardised patch batches, on the CPU."""
    device = net.head.mean.device
    pooled = [net.head.pool(net.features(batch.to(device))).cpu() for batch in batches]
    return torch.cat(pooled) if pooled else torch.empty(0)


def build_descriptor_net(classifier: ExemplarClassifier, cfg: TrainConfig) -> DescriptorNet:
    """The descriptor network of a trained classifier, its head not yet fitted.

    Args:
        classifier: the trained surrogate-class classifier, on any device.
        cfg: gives ``head_layer``, ``head_grid``, ``head_dim`` and ``head_power``.

    Returns:
        Descriptor network on the CPU in eval mode: the classifier's trunk up to ``cfg.head_layer``
        (weights and batch-norm statistics copied) and a head of zeros, fitted by
        :func:`fit_head_on_surrogates`, :func:`fit_head_on_keypoints` or :func:`fit_head_on_pairs`.
    """
    net = DescriptorNet(classifier.trunk.arch, cfg.head_layer, cfg.head_grid, cfg.head_dim, cfg.head_power)
    net.trunk.load_state_dict(classifier.trunk.state_dict(), strict=False)
    return net.eval()


def fitted_on_photos(cfg: TrainConfig) -> bool:
    """Whether the head is fitted on patches of the training photos (the keypoints PCA or the pairs whitening)."""
    return cfg.pca_source == "keypoints" or cfg.whitening == "pairs"


def uses_surrogates(cfg: TrainConfig) -> bool:
    """Whether fitting the head draws surrogate samples (:func:`fit_head_on_surrogates`): for the surrogate
    PCA as the head, or for the head the magnification's tuning describes with (``cfg.magnification`` None);
    never for the learned head, which the training itself gives."""
    return cfg.whitening != "learned" and (not fitted_on_photos(cfg) or cfg.magnification is None)


def fit_head_on_surrogates(
    net: DescriptorNet, sampler: SurrogateSampler, cfg: TrainConfig, device: torch.device, gen: torch.Generator
) -> float:
    """Fit ``net``'s PCA (in place) on ``cfg.pca_patches`` fresh surrogate samples, drawn with ``gen``.

    Args:
        net: descriptor network from :func:`build_descriptor_net`; it runs on ``device`` and is left on the CPU.
        sampler: the run's surrogate classes.
        cfg: gives ``pca_patches`` and ``whiten``.
        device: the device the features are computed on (``gen``'s).
        gen: generator of the samples' classes and transformations.

    Returns:
        Fraction of variance the kept components explain.
    """
    net.to(device)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, cfg.pca_patches, 1024):
            count = min(1024, cfg.pca_patches - start)
            ids = torch.randint(sampler.num_classes, (count,), generator=gen, device=gen.device)
            yield sample_patches(sampler, ids, gen)

    ratio = net.head.fit(_pooled(net, batches()), whiten=cfg.whiten)
    net.cpu()
    return float(ratio.sum())


def keypoint_patches(
    images: Sequence[Path | np.ndarray], count: int, magnification: float, patch_size: int = 32, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Patches at SIFT keypoints of the images, cut as :class:`exemplar_desc.ExemplarDescriptor` cuts them.

    Each image gives ``ceil(count / len(images))`` of its keypoints (OpenCV's SIFT detector
    with its defaults), drawn at random with ``seed``, or all it has if fewer; the patches
    are oriented by the keypoints' angles, ``magnification x KeyPoint.size`` pixels wide.

    Args:
        images: paths (unreadable ones are skipped) or (H, W, 3) RGB / (H, W) grey uint8 arrays.
        count: patches wanted in all; fewer come when the images have too few keypoints.

    Yields:
        (B, 1, P, P) float32 patches, each standardised to zero mean and unit variance, one batch per image.
    """
    rng = np.random.default_rng(seed)
    sift = cv2.SIFT_create()
    per_image = math.ceil(count / max(1, len(images)))
    left = count
    for image in tqdm(images, desc="PCA keypoint patches", unit="img", leave=False):
        if left <= 0:
            return
        gray = read_gray(image)
        if gray is None:
            continue
        kps = sift.detect(gray, None)
        if not kps:
            continue
        chosen = rng.choice(len(kps), min(per_image, left, len(kps)), replace=False)
        xy, size, angle = keypoints_to_arrays([kps[i] for i in chosen])
        pyramid = build_pyramid(gray.astype(np.float32) / 255)
        yield normalize_patches(extract_patches(pyramid, xy, keypoint_frames(size, angle, magnification), patch_size))
        left -= len(chosen)


def fit_head_on_keypoints(
    net: DescriptorNet, images: Sequence[Path | np.ndarray], magnification: float, cfg: TrainConfig
) -> float:
    """Refit ``net``'s PCA (in place) on ``cfg.pca_patches`` patches at SIFT keypoints of the
    images (:func:`keypoint_patches`), the patches the descriptor sees, rather than on
    surrogate samples.

    Args:
        net: descriptor network from :func:`build_descriptor_net`, on any device.
        images: as for :func:`keypoint_patches`.
        magnification: patch side in units of ``KeyPoint.size``, the model's.
        cfg: gives ``pca_patches``, ``patch_size``, ``seed`` and ``whiten``.

    Returns:
        Fraction of variance the kept components explain.

    Raises:
        OptionError (``pca_source``): the images have fewer keypoints than the head has dimensions.
    """
    pooled = _pooled(net.eval(), keypoint_patches(images, cfg.pca_patches, magnification, cfg.patch_size, cfg.seed))
    dim = net.head.projection.shape[1]
    if len(pooled) <= dim:
        raise OptionError("pca_source", "keypoints", f"the training images gave {len(pooled)} SIFT keypoints, "
                          f"the {dim}-D head needs more than {dim}")
    logger.info("fitting the head's PCA on %d patches at SIFT keypoints of the training images", len(pooled))
    return float(net.head.fit(pooled, whiten=cfg.whiten).sum())


@torch.no_grad()
def fit_head_on_pairs(net: DescriptorNet, images: Sequence[Path | np.ndarray], magnification: float, cfg: TrainConfig) -> tuple[float, dict]:
    """Refit ``net``'s head (in place) as a learned whitening of positive pairs (:meth:`DescriptorHead.fit_pairs`).

    The pairs are SIFT keypoints of ``cfg.pair_photos`` training photos re-detected in
    ``cfg.pair_views`` synthetic views of each (:func:`.pairs.warped_pairs`), cut at
    ``magnification``, no labels.

    Args:
        net: descriptor network, on any device.
        images: as for :func:`keypoint_patches`.
        magnification: patch side in units of ``KeyPoint.size``, the model's.
        cfg: gives ``pair_photos``, ``pair_views``, ``pair_shrinkage``, ``pair_emphasis``, ``whiten``, ``patch_size`` and ``seed``.

    Returns:
        (fraction of the whitened features' variance the head keeps, the card's record of the fit).

    Raises:
        OptionError (``pair_photos``): the photos gave no more pairs than the head has dimensions.
    """
    device = net.eval().head.mean.device
    pooled = (
        (net.head.pool(net.features(a.to(device))).cpu(), net.head.pool(net.features(b.to(device))).cpu())
        for a, b in configured_pairs(images, magnification, cfg, cfg.seed)
    )
    try:
        ratio, count = net.head.fit_pairs(pooled, whiten=cfg.whiten, shrinkage=cfg.pair_shrinkage, emphasis=cfg.pair_emphasis)
    except ValueError as err:  # too few pairs: the whitening exponent and shrinkage were checked with the settings
        raise OptionError("pair_photos", cfg.pair_photos, f"too few positive pairs: {err}") from None
    logger.info("fitted the head's learned whitening on %d positive pairs of %d photos", count, min(cfg.pair_photos, len(images)))
    record = {"pairs": count, "photos": min(cfg.pair_photos, len(images)), "views_per_photo": cfg.pair_views,
              "shrinkage": cfg.pair_shrinkage, "emphasis": cfg.pair_emphasis, "whiten": cfg.whiten, "noise": cfg.pair_noise, "jpeg": cfg.pair_jpeg, **PAIR_SETTINGS}
    return float(ratio.sum()), record
