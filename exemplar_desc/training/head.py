"""Fitting the descriptor head (pooling, power, PCA, whitening) of a trained classifier."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checks import OptionError
from ..networks import DescriptorHead, DescriptorNet, ExemplarClassifier
from ..patches import build_pyramid, extract_patches, keypoint_frames, keypoints_to_arrays, normalize_patches
from .config import TrainConfig
from .losses import info_nce_loss
from .magnification import read_gray
from .pairs import PAIR_SETTINGS, configured_pairs
from .transforms import SurrogateSampler, sample_patches

logger = logging.getLogger(__name__)

__all__ = ["build_descriptor_net", "fitted_on_photos", "uses_surrogates", "fit_head_on_surrogates", "fit_head_on_keypoints",
           "fit_head_on_pairs", "tune_head_on_pairs", "keypoint_patches"]


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
        cfg: gives ``head_layer``, ``head_grid``, ``head_dim``, ``head_power`` and ``head_pooling``.

    Returns:
        Descriptor network on the CPU in eval mode: the classifier's trunk up to ``cfg.head_layer``
        (weights and batch-norm statistics copied) and a head of zeros, fitted by
        :func:`fit_head_on_surrogates`, :func:`fit_head_on_keypoints` or :func:`fit_head_on_pairs`.
    """
    net = DescriptorNet(classifier.trunk.arch, cfg.head_layer, cfg.head_grid, cfg.head_dim, cfg.head_power, cfg.head_pooling)
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
    images: Sequence[Path | np.ndarray], count: int, magnification: float, patch_size: int = 32, seed: int = 0,
    min_side: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Patches at SIFT keypoints of the images, cut as :class:`exemplar_desc.ExemplarDescriptor` cuts them.

    Each image gives ``ceil(count / len(images))`` of its keypoints (OpenCV's SIFT detector
    with its defaults), drawn at random with ``seed``, or all it has if fewer; the patches
    are oriented by the keypoints' angles, ``magnification x KeyPoint.size`` pixels wide, at least ``min_side``.

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
    for image in tqdm(images, desc="keypoint patches", unit="img", leave=False):
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
        yield normalize_patches(extract_patches(pyramid, xy, keypoint_frames(size, angle, magnification, min_side), patch_size))
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
    pooled = _pooled(net.eval(), keypoint_patches(images, cfg.pca_patches, magnification, cfg.patch_size, cfg.seed,
                                                  cfg.min_patch_side))
    dim = net.head.projection.shape[1]
    if len(pooled) <= dim:
        raise OptionError("pca_source", "keypoints", f"the training images gave {len(pooled)} SIFT keypoints, "
                          f"the {dim}-D head needs more than {dim}")
    logger.info("fitting the head's PCA on %d patches at SIFT keypoints of the training images", len(pooled))
    return float(net.head.fit(pooled, whiten=cfg.whiten).sum())


#: Pairs per InfoNCE step of the pairs whitening's tuning, and Adam's step size relative to the projection's spread.
TUNE_BATCH, TUNE_LR = 256, 1e-3


def fit_head_on_pairs(net: DescriptorNet, images: Sequence[Path | np.ndarray], magnification: float, cfg: TrainConfig) -> tuple[float, dict]:
    """Refit ``net``'s head (in place) as a learned whitening of positive pairs (:meth:`DescriptorHead.fit_pairs`),
    then tune its projection by ``cfg.pair_tune_steps`` steps of InfoNCE on the same pairs (:func:`tune_head_on_pairs`).

    The pairs are SIFT keypoints of ``cfg.pair_photos`` training photos re-detected in
    ``cfg.pair_views`` synthetic views of each (:func:`.pairs.warped_pairs`), cut at
    ``magnification``, no labels.

    Args:
        net: descriptor network, on any device.
        images: as for :func:`keypoint_patches`.
        magnification: patch side in units of ``KeyPoint.size``, the model's.
        cfg: gives ``pair_photos``, ``pair_views``, ``pair_shrinkage``, ``pair_emphasis``, ``pair_tune_steps``,
            ``pair_temperature``, ``whiten``, ``patch_size`` and ``seed``.

    Returns:
        (fraction of the whitened features' variance the head keeps, the card's record of the fit).

    Raises:
        OptionError (``pair_photos``): the photos gave no more pairs than the head has dimensions.
    """
    device = net.eval().head.mean.device
    views: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept for the tuning only

    @torch.no_grad()
    def pooled() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for a, b in configured_pairs(images, magnification, cfg, cfg.seed):
            pair = net.head.pool(net.features(a.to(device))).cpu(), net.head.pool(net.features(b.to(device))).cpu()
            if cfg.pair_tune_steps:  # half precision: 0.7 GB for the default 81k pairs, and as much for their compressed copy
                views.append((pair[0].half(), pair[1].half()))
            yield pair

    try:
        ratio, count = net.head.fit_pairs(pooled(), whiten=cfg.whiten, shrinkage=cfg.pair_shrinkage, emphasis=cfg.pair_emphasis)
    except ValueError as err:  # too few pairs: the whitening exponent and shrinkage were checked with the settings
        raise OptionError("pair_photos", cfg.pair_photos, f"too few positive pairs: {err}") from None
    logger.info("fitted the head's learned whitening on %d positive pairs of %d photos", count, min(cfg.pair_photos, len(images)))
    tune = None
    if cfg.pair_tune_steps:
        loss = tune_head_on_pairs(net.head, views, cfg.pair_tune_steps, cfg.pair_temperature, cfg.seed)
        tune = {"steps": cfg.pair_tune_steps, "temperature": cfg.pair_temperature, "batch": TUNE_BATCH, "lr": TUNE_LR,
                "negatives": "the other keypoints of the same view", "final_loss": round(loss, 4)}
    record = {"pairs": count, "photos": min(cfg.pair_photos, len(images)), "views_per_photo": cfg.pair_views,
              "shrinkage": cfg.pair_shrinkage, "emphasis": cfg.pair_emphasis, "tune": tune, "whiten": cfg.whiten,
              "noise": cfg.pair_noise, "jpeg": cfg.pair_jpeg, "shading": cfg.pair_shading, **PAIR_SETTINGS}
    return float(ratio.sum()), record


def tune_head_on_pairs(
    head: DescriptorHead, views: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int, temperature: float, seed: int
) -> float:
    """Tune ``head``'s projection (in place) by InfoNCE (:func:`.losses.info_nce_loss`) on positive pairs.

    Each step takes whole views, drawn at random with ``seed``, until :data:`TUNE_BATCH` pairs (or all),
    so a keypoint's negatives are the other keypoints of its photo and view, the ones matching
    must tell it from; Adam, step size :data:`TUNE_LR` x the projection's standard deviation.
    The mean stays the fitted one, so the descriptor keeps its form and cost.

    Args:
        head: a fitted head, on any device (the views' batches are moved to it).
        views: per view, two (K, F * grid * grid) pooled feature batches (:meth:`DescriptorHead.pool`) of its pairs.
        steps: >= 1.
        temperature: > 0.

    Returns:
        The mean loss of the last (at most 50) steps.
    """
    gen = torch.Generator().manual_seed(seed)
    compressed = [(head._compress(a.float()).half(), head._compress(b.float()).half()) for a, b in views]
    projection = torch.nn.Parameter(head.projection.clone())
    optimizer = torch.optim.Adam([projection], lr=TUNE_LR * float(head.projection.std()))
    losses = []
    for _ in tqdm(range(steps), desc="tuning the head", unit="step", leave=False):
        chosen, size = [], 0
        for view in torch.randperm(len(compressed), generator=gen).tolist():  # no view twice: one positive per row
            chosen.append(view)
            size += len(compressed[view][0])
            if size >= TUNE_BATCH:
                break
        a, b = (torch.cat([compressed[i][k] for i in chosen])[:TUNE_BATCH].to(head.mean.device, torch.float32) for k in (0, 1))
        loss = info_nce_loss(F.normalize((a - head.mean) @ projection, dim=1), F.normalize((b - head.mean) @ projection, dim=1),
                             temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        head.projection.copy_(projection)
    logger.info("tuned the head's projection by %d InfoNCE steps (temperature %g): mean loss of the first and last "
                "(at most) 50 steps %.4f -> %.4f", steps, temperature, float(np.mean(losses[:50])), float(np.mean(losses[-50:])))
    return float(np.mean(losses[-50:]))
