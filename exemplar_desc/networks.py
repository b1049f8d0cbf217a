"""Exemplar-CNN networks built from the paper's notation, and the descriptor head.

Notation (Dosovitskiy et al.): ``64c5`` is a convolution with 64 filters of 5x5,
``s2`` appended gives it stride 2, ``512f`` is a fully connected layer of 512 units.
``"64c5-128c5-256c5-512f"`` is the main NIPS 2014 network.

Official choices: convolutions padded to keep the size (stride 1), ReLU, 3x3 stride-2
max-pooling after the first two convolutions, dropout 0.5 on the fully connected layer,
and a softmax classifier over the surrogate classes for training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Architecture",
    "ARCHITECTURES",
    "parse_architecture",
    "resolve_architecture",
    "architecture_from_dict",
    "ConvTrunk",
    "ExemplarClassifier",
    "MatchingHead",
    "DescriptorHead",
    "DescriptorNet",
    "compress_nonnegative",
    "count_flops",
]

_CONV = re.compile(r"^(\d+)c(\d+)(?:s(\d+))?$")
_FC = re.compile(r"^(\d+)f$")


@dataclass(frozen=True)
class Architecture:
    """A parsed network description.

    Attributes:
        spec: the notation string, e.g. ``"64c5-128c5-256c5-512f"``.
        convs: (filters, kernel, stride) per convolution.
        fcs: units per fully connected layer (before the classifier).
        pool_after: max-pool (3x3, stride 2) after each of the first ``pool_after`` convolutions.
        batch_norm: batch normalisation after each convolution (not in the paper).
    """

    spec: str
    convs: tuple[tuple[int, int, int], ...]
    fcs: tuple[int, ...]
    pool_after: int = 2
    batch_norm: bool = False

    def to_dict(self) -> dict:
        return {"spec": self.spec, "pool_after": self.pool_after, "batch_norm": self.batch_norm}


def parse_architecture(spec: str, pool_after: int = 2, batch_norm: bool = False) -> Architecture:
    """Parse the paper's notation, e.g. ``"64c7s2-128c5-256c5-512f"``.

    Raises:
        ValueError: malformed token, no convolution, or a convolution after a fc layer.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("architecture must be a non-empty string such as '64c5-128c5-256c5-512f'")
    convs: list[tuple[int, int, int]] = []
    fcs: list[int] = []
    for token in spec.strip().split("-"):
        conv, fc = _CONV.match(token), _FC.match(token)
        if conv:
            if fcs:
                raise ValueError(f"convolution {token!r} after a fully connected layer in {spec!r}")
            filters, kernel, stride = int(conv[1]), int(conv[2]), int(conv[3] or 1)
            if min(filters, kernel, stride) < 1:
                raise ValueError(f"zero-sized layer {token!r} in {spec!r}")
            convs.append((filters, kernel, stride))
        elif fc:
            if int(fc[1]) < 1:
                raise ValueError(f"zero-sized layer {token!r} in {spec!r}")
            fcs.append(int(fc[1]))
        else:
            raise ValueError(
                f"bad layer {token!r} in {spec!r}: expected '<filters>c<kernel>[s<stride>]' or '<units>f'"
            )
    if not convs:
        raise ValueError(f"architecture {spec!r} has no convolution")
    if not 0 <= pool_after <= len(convs):
        raise ValueError(f"pool_after must be in [0, {len(convs)}], got {pool_after}")
    return Architecture(spec.strip(), tuple(convs), tuple(fcs), pool_after, batch_norm)


#: Named architectures. The paper's nets keep their official layout; ``fast`` is ours:
#: strided convolutions instead of max-pooling and batch normalisation, ~12 MFLOP per
#: 32x32 patch up to its last convolution, so the descriptor keeps pace with SIFT on a CPU.
ARCHITECTURES: dict[str, Architecture] = {
    "exemplar-small": parse_architecture("64c5-64c5-128f"),
    "exemplar-nips": parse_architecture("64c5-128c5-256c5-512f"),
    "exemplar-large": parse_architecture("92c5-256c5-512c5-1024f"),
    "exemplar-blur": parse_architecture("64c7s2-128c5-256c5-512f"),
    "fast": parse_architecture("32c4s2-64c3s2-128c3-256f", pool_after=0, batch_norm=True),
    # Students distilled from fast (the loss distill): half its channels, a quarter of its
    # FLOPs; the same with a strided third convolution, a ninth of its FLOPs; and its first
    # layers with half the channels in the third, about half its FLOPs.
    "fast-small": parse_architecture("16c4s2-32c3s2-64c3-256f", pool_after=0, batch_norm=True),
    "fast-tiny": parse_architecture("16c4s2-32c3s2-64c3s2-256f", pool_after=0, batch_norm=True),
    "fast-medium": parse_architecture("32c4s2-48c3s2-64c3-256f", pool_after=0, batch_norm=True),
    # fast with three quarters and half the filters of its third convolution, started from a fast model's channels
    # of most weight (``init``, training/init_model.py); 0.8x and 0.6x fast's int8 network time.
    "fast-96": parse_architecture("32c4s2-64c3s2-96c3-256f", pool_after=0, batch_norm=True),
    "fast-64": parse_architecture("32c4s2-64c3s2-64c3-256f", pool_after=0, batch_norm=True),
}


def resolve_architecture(name_or_spec: str, pool_after: int | None = None, batch_norm: bool | None = None) -> Architecture:
    """A named architecture from :data:`ARCHITECTURES`, or a notation string parsed with the paper's defaults."""
    base = ARCHITECTURES.get(name_or_spec) or parse_architecture(name_or_spec)
    return parse_architecture(
        base.spec,
        base.pool_after if pool_after is None else pool_after,
        base.batch_norm if batch_norm is None else batch_norm,
    )


class ConvTrunk(nn.Module):
    """The convolutional layers of an Exemplar-CNN.

    Input (B, C, P, P) float patches; output of :meth:`forward` the feature map after the
    last convolution (with ReLU and, where the architecture says so, pooling).
    """

    def __init__(self, arch: Architecture, in_channels: int = 1) -> None:
        super().__init__()
        self.arch = arch
        blocks = []
        channels = in_channels
        for i, (filters, kernel, stride) in enumerate(arch.convs):
            layers: list[nn.Module] = [
                nn.Conv2d(channels, filters, kernel, stride=stride, padding=(kernel - 1) // 2, bias=not arch.batch_norm)
            ]
            if arch.batch_norm:
                layers.append(nn.BatchNorm2d(filters))
            layers.append(nn.ReLU(inplace=True))
            if i < arch.pool_after:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
            blocks.append(nn.Sequential(*layers))
            channels = filters
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Feature map of convolution ``upto`` (0-based, negative from the end; default the last).

        Args:
            x: (B, C, P, P) float tensor.

        Returns:
            (B, F, h, w) float tensor.
        """
        last = len(self.blocks) - 1 if upto is None else upto % len(self.blocks)
        for block in self.blocks[: last + 1]:
            x = block(x)
        return x


class ExemplarClassifier(nn.Module):
    """Trunk + fully connected layers with dropout 0.5 + linear classifier over surrogate classes.

    Input (B, C, P, P) float patches; output (B, num_classes) logits.
    """

    def __init__(self, arch: Architecture, num_classes: int, in_channels: int = 1, patch_size: int = 32) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least 2 surrogate classes, got {num_classes}")
        self.trunk = ConvTrunk(arch, in_channels)
        with torch.no_grad():
            flat = self.trunk(torch.zeros(1, in_channels, patch_size, patch_size)).numel()
        layers: list[nn.Module] = [nn.Flatten()]
        for units in arch.fcs:
            layers += [nn.Linear(flat, units), nn.ReLU(inplace=True), nn.Dropout(0.5)]
            flat = units
        self.fc = nn.Sequential(*layers)
        self.classifier = nn.Linear(flat, num_classes)

        #: A :class:`MatchingHead` set for the matching losses: forward then also returns descriptors.
        self.matching: MatchingHead | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, P, P) patches -> (B, num_classes) logits; with a matching head, (logits, (B, dim) descriptors).

        With a probe-only matching head the classifier sees detached features: it learns to
        classify (its accuracy is logged) without training the trunk.
        """
        if self.matching is None:
            return self.classifier(self.fc(self.trunk(x)))
        layer = self.matching.layer % len(self.trunk.blocks)
        features = self.trunk(x, upto=layer)
        rest = features
        for block in self.trunk.blocks[layer + 1 :]:
            rest = block(rest)
        if self.matching.probe_only:
            rest = rest.detach()
        return self.classifier(self.fc(rest)), self.matching(features)


class MatchingHead(nn.Module):
    """The descriptor head in training form, for the losses on descriptors: its projection is learned.

    The map of :class:`DescriptorHead` (pooling grid, power compression, centring,
    projection, L2 normalisation), with the projection a parameter, so that the loss trains
    the trunk through the descriptor that matching uses.

    Args:
        layer: conv layer (0-based, negative from the end) whose feature maps it describes.
        head: the head it starts from: its grid, power, mean and projection are copied.
        probe_only: the surrogate classifier trains on detached features (losses without softmax).

    Shape:
        - Input: (B, F, h, w) feature maps of ``layer``.
        - Output: (B, dim) unit-length descriptors.
    """

    def __init__(self, layer: int, head: "DescriptorHead", probe_only: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.grid = head.grid
        self.power = head.power
        self.pooling = head.pooling
        self.probe_only = probe_only
        self.register_buffer("mean", head.mean.detach().clone())
        self.projection = nn.Parameter(head.projection.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize((_compress(_pool(features, self.grid, self.pooling), self.power) - self.mean) @ self.projection, dim=1)


#: The head's pooling of each grid cell: its maximum (every shipped card) or its mean.
POOLINGS = {"max": F.adaptive_max_pool2d, "avg": F.adaptive_avg_pool2d}
#: The same poolings with a fixed kernel, which equal them where the grid divides the map
#: (quantised maps and ONNX graphs have no adaptive form).
FIXED_POOLINGS = {"max": F.max_pool2d, "avg": F.avg_pool2d}


def _pool(features: torch.Tensor, grid: int, pooling: str = "max") -> torch.Tensor:
    """(B, F, h, w) feature maps -> (B, F * grid * grid) vectors pooled by ``pooling`` (:data:`POOLINGS`)."""
    return POOLINGS[pooling](features, grid).flatten(1)


def _compress(pooled: torch.Tensor, power: float) -> torch.Tensor:
    """``sign(x) |x|^power``; below 1e-12 the magnitude is clamped, so the gradient at 0 is 0, not infinite."""
    return pooled if power == 1 else pooled.sign() * pooled.abs().clamp_min(1e-12).pow(power)


def compress_nonnegative(pooled: torch.Tensor, power: float, inplace: bool = False) -> torch.Tensor:
    """``pooled ** power`` of features that leave a ReLU (>= 0): the descriptor head's power.

    Zeros (a ReLU's) are raised as float32's smallest normal number (1e-19 after a square
    root, far below the rounding of the output): torch's vectorised root is several times
    slower on exact zeros, which are half the pooled values.

    Args:
        pooled: float tensor of any shape, >= 0.
        power: exponent in (0, 1]; 1 returns ``pooled`` itself.
        inplace: overwrite ``pooled`` (a temporary of the caller's) instead of a new tensor:
            one fewer buffer of the batch's pooled size to allocate and fill.
    """
    if power == 1:
        return pooled
    tiny = torch.finfo(torch.float32).tiny
    return (pooled.clamp_min_(tiny) if inplace else pooled.clamp_min(tiny)).pow_(power)


def _pair_moments(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], compress: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 sums over (B, D) batches of pairs (x, y), ``compress``-ed: the number of pairs,
    sum of x and y (D,), sum of x x^T + y y^T (D, D), sum of (x - y)(x - y)^T (D, D)."""
    count, total, outer, within = 0, torch.zeros(()), torch.zeros(()), torch.zeros(())
    for a, b in pairs:
        a, b = compress(a.double()), compress(b.double())
        diff = a - b
        count += len(a)
        total, outer, within = total + a.sum(0) + b.sum(0), outer + a.T @ a + b.T @ b, within + diff.T @ diff
    return count, total, outer, within


class DescriptorHead(nn.Module):
    """Conv features pooled to a ``grid x grid`` layout, power-compressed, PCA-projected, L2-normalised.

    The PCA (mean and projection, whitening optional) is fitted on unlabeled patches by
    :meth:`fit`; before that the head holds zeros and refuses to run.

    Args:
        in_channels: channels F of the feature maps.
        grid: side of the pooling grid.
        dim: descriptor dimension after the PCA.
        power: exponent p in (0, 1] applied to the pooled features before the PCA, keeping
            the sign (0.5 is RootSIFT's square root: it damps the few large activations that
            would dominate Euclidean distances; 1 leaves the features unchanged).
        pooling: ``"max"`` (each cell's strongest response) or ``"avg"`` (its mean, less
            moved by a single response of JPEG blocks or sensor noise).
    """

    def __init__(self, in_channels: int, grid: int = 4, dim: int = 128, power: float = 1.0, pooling: str = "max") -> None:
        super().__init__()
        in_dim = in_channels * grid * grid
        if not 1 <= dim <= in_dim:
            raise ValueError(f"descriptor dimension must be in [1, {in_dim}], got {dim}")
        if not 0 < power <= 1:
            raise ValueError(f"head power must be in (0, 1], got {power}")
        if pooling not in POOLINGS:
            raise ValueError(f"head pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        self.grid = grid
        self.power = float(power)
        self.pooling = pooling
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("projection", torch.zeros(in_dim, dim))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) feature maps -> (B, F * grid * grid) pooled vectors."""
        return _pool(features, self.grid, self.pooling)

    def _compress(self, pooled: torch.Tensor) -> torch.Tensor:
        return _compress(pooled, self.power)

    def cell_major_projection(self) -> torch.Tensor:
        """(F * grid * grid, dim) the projection's rows reordered cell by cell, the order of
        pooled channels-last maps (``(B, g, g, F)`` flattened); a view where no copy is needed."""
        return self.projection.view(-1, self.grid * self.grid, self.projection.shape[1]).transpose(0, 1)

    def _principal(self, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``dim`` leading eigenpairs of a symmetric (D, D) float64 matrix, from one eigendecomposition:
        (dim,) eigenvalues (descending, clamped at 0), (D, dim) eigenvectors, each signed so that
        its largest entry is positive (refits on the same data are identical), and the () total
        variance, the sum of all D eigenvalues clamped at 0 (the denominator of the explained ratios)."""
        eigval, eigvec = torch.linalg.eigh(cov)
        total = eigval.clamp_min(0).sum()
        order = torch.argsort(eigval, descending=True)[: self.projection.shape[1]]
        eigval, eigvec = eigval[order].clamp_min(0), eigvec[:, order]
        return eigval, eigvec * torch.sign(eigvec[eigvec.abs().argmax(0), torch.arange(eigvec.shape[1])]), total

    @torch.no_grad()
    def fit(self, pooled: torch.Tensor, whiten: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
        """Fit the PCA on (M, F * grid * grid) pooled features.

        Args:
            pooled: from :meth:`pool`.
            whiten: exponent w in [0, 1]: component k is divided by ``sqrt(eigenvalue_k) ** w``
                (0: plain PCA, 1: full whitening, in between: partial whitening).

        Returns:
            (dim,) explained variance ratio of each kept component.
        """
        if not 0 <= whiten <= 1:
            raise ValueError(f"whitening exponent must be in [0, 1], got {whiten}")
        pooled = self._compress(pooled.double())
        mean = pooled.mean(0)
        cov = torch.cov((pooled - mean).T)
        eigval, eigvec, total = self._principal(cov)
        if whiten:
            eigvec = eigvec / torch.sqrt(eigval + eps * eigval.max()) ** whiten
        self.mean.copy_(mean.float())
        self.projection.copy_(eigvec.float())
        return eigval / total

    @torch.no_grad()
    def fit_pairs(
        self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], whiten: float = 1.0, shrinkage: float = 0.1,
        emphasis: float = 0.0, eps: float = 1e-6,
    ) -> tuple[torch.Tensor, int]:
        """Fit a learned whitening (Radenovic et al., TPAMI 2018) on pooled features of positive pairs.

        With x, y the power-compressed pooled features of the two views of a pair, the
        within-pair covariance ``C_w = E[(x - y)(x - y)^T]`` is shrunk towards its mean
        eigenvalue, ``(1 - shrinkage) C_w + shrinkage * trace(C_w) / D * I``; the features,
        centred by the mean of both views, are multiplied by ``W = C_w^(-whiten / 2)`` and
        rotated onto the ``dim`` principal axes of the whitened features, axis k scaled by
        ``variance_k ** emphasis``. With full whitening, ``variance_k`` is the ratio of the
        features' variance to the within-pair variance along axis k: a positive emphasis
        weights the axes that tell seeds apart best (it trades mAP for nearest-neighbour
        precision, MMA). The head keeps its form: ``projection = W @ axes @ diag(variance ** emphasis)``,
        so the descriptor costs what the PCA head costs.

        Args:
            pairs: batches of (B, F * grid * grid) pooled features (:meth:`pool`) of the two views.
            whiten: exponent in [0, 1] on the within-pair whitening (1: Radenovic's, 0: a plain PCA).
            shrinkage: in [0, 1].
            emphasis: in [0, 1] (0: every kept axis weighs the same, Radenovic's).
            eps: eigenvalues of ``C_w`` below ``eps`` x the largest are raised to it.

        Returns:
            ((dim,) fraction of the whitened features' variance each kept axis explains, number of pairs).

        Raises:
            ValueError: ``whiten``, ``shrinkage`` or ``emphasis`` out of [0, 1], or fewer pairs than ``dim``.
        """
        for name, value in (("whiten", whiten), ("shrinkage", shrinkage), ("emphasis", emphasis)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        count, total, outer, within = _pair_moments(pairs, self._compress)
        if count <= self.projection.shape[1]:
            raise ValueError(f"{count} pairs cannot fit a {self.projection.shape[1]}-D head: it needs more than {self.projection.shape[1]}")
        mean = total / (2 * count)
        cov = outer / (2 * count) - torch.outer(mean, mean)
        within = within / count
        within = (1 - shrinkage) * within + shrinkage * within.trace() / len(within) * torch.eye(len(within), dtype=within.dtype)
        eigval, eigvec = torch.linalg.eigh(within)
        eigval = eigval.clamp_min(eps * eigval.max())
        whitening = (eigvec * eigval ** (-whiten / 2)) @ eigvec.T
        whitened = whitening @ cov @ whitening
        variance, axes, total = self._principal((whitened + whitened.T) / 2)
        self.mean.copy_(mean.float())
        self.projection.copy_((whitening @ axes * variance.clamp_min(eps * variance.max()) ** emphasis).float())
        return variance / total, count

    def forward(self, features: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
        """(B, F, h, w) conv features, any float dtype -> (B, dim) float32 unit-length descriptors.

        The pooled features are read in their memory order (cell by cell for channels-last
        maps, so they are not copied) against the projection's rows in that order, and the
        centring is a bias of the product. With ``nonnegative`` (features after a ReLU, as
        every trunk's) the signed power is a plain one, a single pass.
        """
        if not torch.any(self.projection):
            raise RuntimeError("descriptor head is not fitted: call fit() on pooled features first")
        # Pooled before the cast to float32: it leaves a grid x grid map to convert instead of
        # the whole map (a maximum of bfloat16 values is exact; a mean is rounded once to
        # bfloat16). A map already grid x grid (the fast-tiny students') is not pooled again:
        # the identity pooling is slow.
        pooled = features if features.shape[-2:] == (self.grid, self.grid) else POOLINGS[self.pooling](features, self.grid)
        pooled = pooled.float()
        owned = pooled is not features  # pooled or cast here; the caller's map itself stays as it is
        projection = self.projection
        if not pooled.is_contiguous():  # channels-last: (B, F, g, g) stored as (B, g, g, F)
            pooled = pooled.permute(0, 2, 3, 1)
            projection = self.cell_major_projection()
        pooled = pooled.reshape(len(pooled), -1)
        projection = projection.reshape(pooled.shape[1], -1)
        pooled = compress_nonnegative(pooled, self.power, inplace=owned) if nonnegative else self._compress(pooled)
        return F.normalize(torch.addmm(-(self.mean @ self.projection), pooled, projection), dim=1)


class DescriptorNet(nn.Module):
    """Inference network: normalised patches (B, 1, P, P) -> descriptors (B, dim), unit L2 norm."""

    def __init__(self, arch: Architecture, layer: int = -1, grid: int = 4, dim: int = 128, power: float = 1.0,
                 pooling: str = "max") -> None:
        super().__init__()
        self.layer = layer % len(arch.convs)
        self.trunk = ConvTrunk(arch, in_channels=1)
        # Only the layers up to the descriptor layer are needed at inference time.
        self.trunk.blocks = self.trunk.blocks[: self.layer + 1]
        self.head = DescriptorHead(arch.convs[self.layer][0], grid, dim, power, pooling)

    @torch.no_grad()
    def fuse_batch_norm(self) -> "DescriptorNet":
        """Fold each batch normalisation into its convolution (eval-mode inference only); returns self."""
        for block in self.trunk.blocks:
            for i in range(len(block) - 1):
                conv, bn = block[i], block[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    block[i] = nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
                    block[i + 1] = nn.Identity()
        return self

    def features(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, 1, P, P) normalised patches -> (B, F, h, w) feature maps of the descriptor layer."""
        return self.trunk(patches)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, 1, P, P) normalised float patches -> (B, dim) float32 descriptors.

        The trunk may hold bfloat16 weights (``trunk.to(torch.bfloat16)``): patches are cast
        to its dtype and the head (PCA, normalisation) still runs in float32.
        """
        dtype = self.trunk.blocks[0][0].weight.dtype
        return self.describe_features(self.features(patches.to(dtype)))

    def describe_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) feature maps of :meth:`features`, any float dtype -> (B, dim) float32 unit descriptors."""
        return self.head(features, nonnegative=True)  # the trunk ends with a ReLU


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of the convolution and linear layers for one input of ``input_shape`` (C, H, W)."""
    total = 0

    def hook(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += 2 * output.numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] // layer.groups
        elif isinstance(layer, nn.Linear):
            total += 2 * layer.in_features * layer.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    return total


def architecture_from_dict(config: dict) -> Architecture:
    """Inverse of :meth:`Architecture.to_dict` (as stored in model cards)."""
    return parse_architecture(config["spec"], config.get("pool_after", 2), config.get("batch_norm", False))

