"""The training losses: the paper's softmax over surrogate classes, and a matching loss.

``softmax`` classifies each sample into its surrogate class (Dosovitskiy et al.). The
matching loss trains the distance that matching compares: each batch holds two views
(independent transformations) of each of B/2 seeds, described by a :class:`MatchingHead`,
and HardNet's hardest-in-batch triplet margin loss (Mishchuk et al., NIPS 2017) pulls the
two views of a seed together and pushes the closest other seed away. ``softmax+triplet``
adds the two, so the classification's invariances (colour, light, blur) stay taught while
the distance is trained; ``triplet`` trains by the matching loss alone (the surrogate
classifier then learns on detached features, a probe whose accuracy is still logged).

``distill`` trains a (smaller) network to give a teacher model's descriptors: the squared
L2 distance between its learned head's descriptors and the teacher's, on the same surrogate
samples (Hinton et al. 2015, on descriptors rather than logits); the classifier is a probe.
``distill+triplet`` adds the triplet term: with the model itself as teacher and init, the
distillation holds the descriptors near the model's while the triplet term trains the distance.
With ``distill_relation`` the batch holds two views of each seed, and
:func:`relational_distillation_loss` adds the teacher's matching ranking between the views
(Park et al., CVPR 2019, on the softmax of cross-view similarities): the squared distance
weighs every direction of the descriptor alike, matching only asks which view is nearest.

``info_nce_loss`` tunes the pairs whitening's projection on its photo pairs (:mod:`.head`).
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from ..networks import DescriptorHead, ExemplarClassifier, MatchingHead
from .config import TrainConfig
from .init_model import head_rows, kept_channels, load_init_model

logger = logging.getLogger(__name__)

__all__ = ["hardest_triplet_loss", "info_nce_loss", "distillation_loss", "relational_distillation_loss", "paired_class_ids", "attach_matching_head"]


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


def info_nce_loss(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (Oord et al. 2018), both ways: the mean cross-entropy of finding row i's positive
    among all N rows, from anchors to positives and back, on cosine similarities / ``temperature``.

    Args:
        anchors: (N, D) unit descriptors of the first views; N >= 2.
        positives: (N, D) unit descriptors of the second views, row i the same point as anchors' row i.
        temperature: > 0; smaller weighs the closest wrong rows more.

    Returns:
        () float32 loss, ``log(N)`` when every similarity is equal.
    """
    if anchors.shape != positives.shape or anchors.ndim != 2 or len(anchors) < 2:
        raise ValueError(f"anchors and positives must be (N, D) with N >= 2, got {tuple(anchors.shape)} and {tuple(positives.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = anchors.float() @ positives.float().T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``|s_i - t_i|^2`` (``2 - 2 s_i.t_i`` for unit rows, so in [0, 4]).

    Args:
        student: (N, D) unit descriptors of the network being trained.
        teacher: (N, D) unit descriptors of the same patches by the teacher (no gradient needed).

    Returns:
        () float32 loss.
    """
    if student.shape != teacher.shape or student.ndim != 2 or len(student) < 1:
        raise ValueError(f"student and teacher must be (N, D) with N >= 1, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    return (student.float() - teacher.float()).square().sum(1).mean()


def relational_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KL divergence from the teacher's to the student's softmax over cross-view similarities, both ways.

    Rows ``i`` and ``i + N/2`` are two views of one seed. Each first view's softmax over its
    cosine similarities to the second views / ``temperature`` (and each second view's over
    the first views) is taken for both networks; the loss is the mean over rows of
    ``KL(teacher || student)``, averaged over the two directions.

    Args:
        student: (N, D) unit descriptors of the network being trained; N even, N >= 4.
        teacher: (N, D) unit descriptors of the same patches by the teacher (no gradient needed).
        temperature: > 0, in cosine similarity; smaller weighs the nearest views more.

    Returns:
        () float32 loss, 0 when the student's similarities between the views are the teacher's.
    """
    if student.shape != teacher.shape or student.ndim != 2 or len(student) < 4 or len(student) % 2:
        raise ValueError(f"student and teacher must be (N, D) with N even and >= 4, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def cross(views: torch.Tensor) -> torch.Tensor:
        first, second = views.float().chunk(2)
        return first @ second.T / temperature

    s, t = cross(student), cross(teacher)
    rows = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    cols = F.kl_div(F.log_softmax(s.T, 1), F.log_softmax(t.T, 1), log_target=True, reduction="batchmean")
    return (rows + cols) / 2


def paired_class_ids(num_classes: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) int64 class ids: B/2 distinct classes, then the same B/2 again (the second views).

    Distinct classes keep a seed's other view the only positive in the batch.
    """
    half = torch.randperm(num_classes, generator=generator, device=generator.device)[: batch_size // 2]
    return torch.cat([half, half])


def attach_matching_head(
    model: ExemplarClassifier, cfg: TrainConfig, start_patches: Callable[[], torch.Tensor] | None = None
) -> None:
    """Give ``model`` the :class:`MatchingHead` of ``cfg.loss``, starting from the init model's head where it has the same form.

    A run from random weights, or from a model whose head has another layer, grid,
    dimension or power, starts from a PCA (whitened by ``cfg.whiten``) of its own initial
    features on the patches ``start_patches`` gives: centred features, so the descriptors
    start spread out, not all near the direction of the features' mean. Without
    ``start_patches`` (a resumed run, whose checkpoint then sets the head) it starts from a
    random orthogonal projection.

    Args:
        start_patches: called only for such a head: (M, 1, P, P) standardised surrogate
            samples, M > ``cfg.head_dim``, on ``model``'s device.
    """
    layer = cfg.head_layer % len(model.trunk.blocks)
    head = DescriptorHead(model.trunk.arch.convs[layer][0], cfg.head_grid, cfg.head_dim, cfg.head_power, cfg.head_pooling)
    source = None
    if cfg.init is not None:
        net, card = load_init_model(cfg.init)
        # The loaded head's form, with the defaults load_model gives cards older than a setting.
        form = (card["head"]["layer"] % len(model.trunk.blocks), net.head.grid, net.head.projection.shape[1], net.head.power,
                net.head.pooling)
        if form == (layer, cfg.head_grid, cfg.head_dim, cfg.head_power, cfg.head_pooling):
            state = net.head.state_dict()
            if head.mean.shape != state["mean"].shape:  # a narrower trunk (init_trunk): the rows of the channels it kept
                widths = [block[0].out_channels for block in model.trunk.blocks[: layer + 1]]
                rows = head_rows(kept_channels(net, widths)[layer], net.head.grid)
                state = {key: value[rows] for key, value in state.items()}
            head.load_state_dict(state)
            source = f"the head of {cfg.init}"
    if source is None and start_patches is not None:
        patches = start_patches()
        # A copy of the trunk, so that its batch-norm statistics stay those of a fresh run.
        trunk = copy.deepcopy(model.trunk).to(patches.device)
        with torch.no_grad():
            head.to(patches.device).fit(head.pool(trunk(patches, upto=layer)), whiten=cfg.whiten)
        head.cpu()
        source = f"a PCA of its initial features on {len(patches)} surrogate samples"
    elif source is None:
        torch.nn.init.orthogonal_(head.projection)
        source = "a random orthogonal projection"
    logger.info("matching head starts from %s", source)
    model.matching = MatchingHead(layer, head, probe_only="softmax" not in cfg.loss)
