"""The training losses: the paper's softmax over surrogate classes, and a matching loss.

``softmax`` classifies each sample into its surrogate class (Dosovitskiy et al.). The
matching loss trains the distance that matching compares: each batch holds two views
(independent transformations) of each of B/2 seeds, described by a :class:`MatchingHead`,
and HardNet's hardest-in-batch triplet margin loss (Mishchuk et al., NIPS 2017) pulls the
two views of a seed together and pushes the closest other seed away. ``softmax+triplet``
adds the two, so the classification's invariances (colour, light, blur) stay taught while
the distance is trained; ``triplet`` trains by the matching loss alone (the surrogate
classifier then learns on detached features, a probe whose accuracy is still logged).
"""

from __future__ import annotations

import logging

import torch

from ..networks import DescriptorHead, ExemplarClassifier, MatchingHead
from .config import TrainConfig
from .init_model import load_init_model

logger = logging.getLogger(__name__)

__all__ = ["hardest_triplet_loss", "paired_class_ids", "attach_matching_head"]


def hardest_triplet_loss(anchors: torch.Tensor, positives: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """HardNet's loss: mean over pairs of ``max(0, margin + d(a_i, p_i) - min(d(a_i, p_j), d(a_j, p_i)))``, j != i.

    Args:
        anchors: (N, D) unit descriptors of the first views; N >= 2.
        positives: (N, D) unit descriptors of the second views, row i the same seed as anchors' row i.
        margin: in descriptor distance (L2 between unit vectors, so in [0, 2]).

    Returns:
        () float32 loss.
    """
    if anchors.shape != positives.shape or anchors.ndim != 2 or len(anchors) < 2:
        raise ValueError(f"anchors and positives must be (N, D) with N >= 2, got {tuple(anchors.shape)} and {tuple(positives.shape)}")
    # |a - p|^2 = 2 - 2 a.p for unit vectors; the epsilon keeps sqrt's gradient finite at 0.
    dist = torch.sqrt((2 - 2 * anchors.float() @ positives.float().T).clamp_min(0) + 1e-8)
    positive = dist.diagonal()
    off = dist + torch.eye(len(dist), device=dist.device, dtype=dist.dtype) * 10
    negative = torch.minimum(off.min(1).values, off.min(0).values)
    return torch.clamp(margin + positive - negative, min=0).mean()


def paired_class_ids(num_classes: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) int64 class ids: B/2 distinct classes, then the same B/2 again (the second views).

    Distinct classes keep a seed's other view the only positive in the batch.
    """
    half = torch.randperm(num_classes, generator=generator, device=generator.device)[: batch_size // 2]
    return torch.cat([half, half])


def attach_matching_head(model: ExemplarClassifier, cfg: TrainConfig) -> None:
    """Give ``model`` the :class:`MatchingHead` of ``cfg.loss``, starting from the init model's head where it has the same form.

    A run from random weights, or from a model whose head has another layer, grid,
    dimension or power, starts from a random orthogonal projection of uncentred features.
    """
    layer = cfg.head_layer % len(model.trunk.blocks)
    head = DescriptorHead(model.trunk.arch.convs[layer][0], cfg.head_grid, cfg.head_dim, cfg.head_power)
    source = None
    if cfg.init is not None:
        net, card = load_init_model(cfg.init)
        form = (card["head"]["layer"] % len(model.trunk.blocks), card["head"]["grid"], card["head"]["dim"], card["head"].get("power", 1.0))
        if form == (layer, cfg.head_grid, cfg.head_dim, cfg.head_power):
            head.load_state_dict(net.head.state_dict())
            source = cfg.init
    if source is None:
        torch.nn.init.orthogonal_(head.projection)
    logger.info("matching head starts from %s", f"the head of {source}" if source else "a random orthogonal projection")
    model.matching = MatchingHead(layer, head, probe_only=cfg.loss == "triplet")
