"""Fitting the descriptor head (pooling, power, PCA, whitening) of a trained classifier."""

from __future__ import annotations

import torch

from ..networks import DescriptorNet, ExemplarClassifier
from .loop import TrainConfig
from .transforms import SurrogateSampler, sample_patches

__all__ = ["fit_head"]


def fit_head(
    classifier: ExemplarClassifier, sampler: SurrogateSampler, cfg: TrainConfig, device: torch.device, gen: torch.Generator
) -> tuple[DescriptorNet, float]:
    """Build the descriptor network from a trained classifier and fit its PCA on fresh samples.

    Returns:
        (descriptor network on the CPU in eval mode, fraction of variance the kept components explain).
    """
    arch = classifier.trunk.arch
    net = DescriptorNet(arch, cfg.head_layer, cfg.head_grid, cfg.head_dim, cfg.head_power)
    net.trunk.load_state_dict(classifier.trunk.state_dict(), strict=False)
    net = net.to(device).eval()
    pooled = []
    with torch.no_grad():
        for start in range(0, cfg.pca_patches, 1024):
            count = min(1024, cfg.pca_patches - start)
            ids = torch.randint(sampler.num_classes, (count,), generator=gen, device=gen.device)
            pooled.append(net.head.pool(net.features(sample_patches(sampler, ids, gen))).cpu())
    ratio = net.head.fit(torch.cat(pooled), whiten=cfg.whiten)
    return net.cpu(), float(ratio.sum())
