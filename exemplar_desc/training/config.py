"""The settings of a training run (:class:`TrainConfig`) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..checks import OptionError, check, check_device, check_number
from ..images import gather_images
from ..networks import ARCHITECTURES, POOLINGS, Architecture, architecture_from_dict, resolve_architecture
from .init_model import describe_architecture, load_init_model, narrows
from .seeds import PAPER_SEED_SCALES, stl10_image_count
from .transforms import FAMILY_RECORDS, TransformConfig

__all__ = ["TrainConfig", "PCA_SOURCES", "WHITENINGS", "LOSSES", "TRIPLET_PAIRS"]

#: What the descriptor head's PCA is fitted on: fresh surrogate samples (transformed seed
#: patches), or patches at SIFT keypoints of the training images (exemplar_desc.training.head).
PCA_SOURCES = ("surrogate", "keypoints")
#: How the head's linear map is fitted: a PCA (whitened by ``whiten``), or a learned whitening
#: of positive pairs of keypoint patches in synthetic views of the training photos
#: (exemplar_desc.training.pairs; DescriptorHead.fit_pairs).
#: ``learned`` keeps the projection that a loss on descriptors trained (TrainConfig.learned_head).
WHITENINGS = ("pca", "pairs", "learned")
#: The training losses (exemplar_desc.training.losses): the paper's softmax over surrogate
#: classes, HardNet's triplet margin loss over two views of each seed, or their sum; the
#: distillation of a teacher model's descriptors, alone or with the triplet term.
LOSSES = ("softmax", "softmax+triplet", "triplet", "distill", "distill+triplet")
#: Where the triplet term's positive pairs come from: two surrogate views of each seed, or
#: keypoint patches of training photos re-detected in synthetic views (exemplar_desc.training.pairs).
TRIPLET_PAIRS = ("surrogate", "photos")


def _setting(default: Any, help: str, unset: str | None = None) -> Any:
    """A field with its help text; ``unset``: what the default None means."""
    return field(default=default, metadata={"help": help, "unset": unset})


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in the checkpoint and the model card).

    Each field's ``metadata["help"]`` says what it sets (``metadata["unset"]``: what None
    means); the command line's options are generated from them. The defaults are the
    paper's settings (:mod:`.presets` names other recipes). ``transforms`` holds the
    transformation families (:data:`.transforms.FAMILY_RECORDS`).
    """

    images: tuple[str, ...] = _setting((), "folders of unlabeled images (searched recursively), or image files")
    stl10: str | None = _setting(None, "STL-10's unlabeled_X.bin (96x96x3 uint8, column-major)", "none")
    stl10_max_images: int | None = _setting(None, "use only the first N STL-10 images", "all")
    max_side: int = _setting(512, "longer image side in pixels the images are downscaled to before seeds are taken")
    arch: str = _setting("fast", "named architecture (fast, exemplar-nips, ...) or notation like 64c5-128c5-256c5-512f")
    num_classes: int = _setting(8000, "surrogate classes (seed patches)")
    seeds_per_image: int = _setting(40, "seed candidates per image")
    seed_scales: tuple[float, ...] = _setting(
        PAPER_SEED_SCALES, "image scales S1,S2,... in (0, 1] the seeds are taken at, the candidates split evenly among them")
    samples_per_class: int = _setting(100, "samples per class per epoch")
    epochs: int = _setting(1, "epochs: passes of the samples per class over every class")
    batch_size: int = _setting(128, "samples per step and process (a distributed run's global batch is the world size x this)")
    lr: float = _setting(0.01, "base learning rate of SGD, on the official step schedule; not scaled with the global batch")
    momentum: float = _setting(0.9, "SGD momentum in [0, 1)")
    weight_decay: float = _setting(0.004, "SGD weight decay (L2)")
    loss: str = _setting(
        "softmax", "training loss: softmax over the surrogate classes (the paper's), triplet: HardNet's hardest-in-batch "
        "triplet margin loss on two views of each seed through a learned descriptor head, softmax+triplet (their sum), or "
        "distill: the squared L2 distance between the learned head's descriptors and the teacher's, distill+triplet (their sum)")
    margin: float = _setting(1.0, "margin of the triplet loss, in L2 distance between unit descriptors (0, 2]")
    triplet_weight: float = _setting(1.0, "weight of the triplet term in softmax+triplet and distill+triplet")
    triplet_pairs: str = _setting(
        "surrogate", "the triplet term's positive pairs: surrogate (two transformed views of each of batch_size / 2 seeds) "
        "or photos (batch_size / 2 pairs a step, beside the batch, from a pool of SIFT keypoints of pair_photos training "
        "photos re-detected in pair_views synthetic views, as for the pairs whitening; needs magnification)")
    teacher: str | None = _setting(
        None, "model (shipped name or .pt/.json path) whose descriptors the distill losses teach; it must have the "
        "same head_dim and patch_size", "none")
    distill_relation: float = _setting(
        0.0, "weight of the distill losses' relational term: the KL divergence from the teacher's to the student's "
        "softmax over the similarities between the two sides of batch_size / 2 positive pairs, their matching ranking: "
        "two surrogate views of each seed, or with distill_photos the photo pairs (0: none)")
    distill_temperature: float = _setting(0.1, "temperature of distill_relation's softmax, in cosine similarity")
    distill_photos: bool = _setting(
        False, "the distill losses also teach the teacher's descriptors of batch_size / 2 photo pairs a step, beside the "
        "batch (the pool of triplet_pairs photos: real keypoint patches in synthetic views; needs magnification)")
    distill_cross: bool = _setting(
        False, "with distill_photos, each photo pair's view is taught the teacher's descriptor of the pair's photo patch, "
        "not of the view's own patch: the student learns to give a warped, relit, blurred, noisy or compressed view "
        "the undegraded patch's descriptor")
    patch_size: int = _setting(32, "side of the network's input patches in pixels")
    context: int = _setting(80, "side of the context crop kept around each seed in pixels")
    val_per_class: int = _setting(1, "held-out surrogate samples per class for the validation accuracy")
    seed: int = _setting(0, "random seed of the seeds, samples, initialisation and dropout")
    device: str = _setting("auto", "torch device of the training: auto (cuda when there is one), cpu, cuda or cuda:N")
    num_threads: int | None = _setting(None, "CPU threads of torch", "torch's choice")
    checkpoint_minutes: float = _setting(5.0, "minutes between checkpoints (one is also written at each epoch's end)")
    time_budget_minutes: float | None = _setting(
        None, "minutes of training after which the run stops; the lr schedule then follows wall time", "none: the epochs set the length")
    head_layer: int = _setting(-1, "conv layer of the descriptor (0-based, -1: the last)")
    head_grid: int = _setting(4, "pooling grid of the descriptor (G x G cells)")
    head_pooling: str = _setting("max", "how the head pools each grid cell: max (its strongest response) or avg (its mean)")
    head_dim: int = _setting(128, "descriptor dimension after the PCA")
    head_power: float = _setting(0.5, "exponent in (0, 1] on the pooled features before the PCA (0.5: square root, 1: none)")
    whiten: float = _setting(
        0.25, "whitening exponent W in [0, 1] (0: none, 1: full): with the pca whitening, component k divided by "
        "sqrt(eigenvalue_k)^W; with pairs, the features multiplied by C^(-W/2), C the within-pair covariance")
    whitening: str = _setting(
        "pca", "the head's linear map: pca (on pca_source's patches); pairs: a learned whitening of positive pairs, "
        "SIFT keypoints of training photos re-detected in synthetic views of them (homography, blur, gamma, gain), "
        "then a PCA (Radenovic et al. 2018); or learned: the projection the loss trained (losses other than softmax)")
    pair_photos: int = _setting(200, "training photos the positive pairs of the pairs whitening come from")
    pair_views: int = _setting(3, "synthetic views per photo for the positive pairs")
    pair_noise: float = _setting(0.0, "largest sigma, in grey levels of 255, of the Gaussian sensor noise on the pairs' "
                                 "views, drawn uniformly per view (0: none)")
    pair_jpeg: int | None = _setting(None, "lowest JPEG quality of the pairs' views, drawn uniformly in [Q, 95] per view",
                                     "no compression")
    pair_shading: float = _setting(0.0, "largest log-gain of a smooth shading on the pairs' views, drawn uniformly per view, "
                                   "with 0 to 2 soft cast shadows, in linear light after the gamma and gain (0: neither)")
    pair_shrinkage: float = _setting(0.1, "shrinkage in [0, 1] of the within-pair covariance towards its mean eigenvalue")
    pair_emphasis: float = _setting(0.0, "exponent in [0, 1] on each kept axis' ratio of feature to within-pair variance, "
                                    "its weight in the descriptor (0: equal weights; more: fewer wrong nearest neighbours, "
                                    "a flatter ranking)")
    pair_tune_steps: int = _setting(0, "steps of InfoNCE that tune the pairs whitening's projection on its pairs after the "
                                    "fit, each keypoint's negatives the other keypoints of its view (0: none)")
    pair_temperature: float = _setting(0.03, "InfoNCE temperature of pair_tune_steps")
    pca_patches: int = _setting(20000, "fresh patches the PCA is fitted on")
    pca_source: str = _setting(
        "surrogate", "what the PCA is fitted on: surrogate samples, or patches at SIFT keypoints of the training images "
        "cut at the chosen magnification")
    magnification: float | None = _setting(
        None, "patch side / KeyPoint.size of the descriptor", "tuned on synthetic warps of the training images")
    min_patch_side: float = _setting(
        0.0, "smallest patch side in pixels of the descriptor's patches (0: none): keypoints narrower than "
        "min_patch_side / magnification get patches of this side (the head's, the int8 calibration's and the card's)")
    init: str | None = _setting(
        None, "model (shipped name or .pt/.json path) whose conv layers the run starts from; the classifier layers "
        "start fresh; arch gives the model's architecture or one with fewer filters per convolution, which starts "
        "from the model's channels of most weight", "random weights")
    transforms: TransformConfig = TransformConfig()

    @property
    def matching(self) -> bool:
        """Whether the loss has the matching (triplet) term: batches then hold two views of each seed."""
        return "triplet" in self.loss

    @property
    def paired_views(self) -> bool:
        """Whether the batch holds two surrogate views of each seed (the triplet term on surrogate pairs, or the relational distillation)."""
        return (self.matching and self.triplet_pairs == "surrogate") or (self.distill_relation > 0 and not self.distill_photos)

    @property
    def photo_pairs(self) -> bool:
        """Whether the triplet term or the distillation takes pairs from a pool of photo pairs made before training."""
        return (self.matching and self.triplet_pairs == "photos") or (self.distills and self.distill_photos)

    @property
    def distills(self) -> bool:
        """Whether the loss has the distillation term: the teacher then describes every sample."""
        return self.loss.startswith("distill")

    @property
    def learned_head(self) -> bool:
        """Whether the loss trains through a learned descriptor head (every loss but softmax)."""
        return self.loss != "softmax"

    def check(self, data: bool = True) -> None:
        """Check every setting before any work is done.

        Args:
            data: also check the image folders and the STL-10 file (ranks > 0 of a
                distributed run do not read them, and their machine may not have them).

        Raises:
            OptionError: the first bad setting, named by its field (a family by its name).
        """
        _check_data(self, data)
        arch = _check_arch(self)
        for name, bounds in _BOUNDS.items():
            value = getattr(self, name)
            if value is not None or _FIELDS[name].default is not None:
                check_number(name, value, **bounds)
        check_number("max_side", self.max_side, low=2 * self.patch_size, integer=True)
        check(
            len(self.seed_scales) > 0 and all(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1 for v in self.seed_scales),
            "seed_scales", ",".join(f"{v:g}" for v in self.seed_scales), "expected S1,S2,... with every 0 < S <= 1",
        )
        check_device("device", self.device, allow_auto=True)
        layers = len(arch.convs)
        check_number("head_layer", self.head_layer, low=-layers, high=layers - 1, integer=True)
        pooled = arch.convs[self.head_layer][0] * self.head_grid**2
        check_number("head_dim", self.head_dim, low=1, high=pooled, integer=True)
        check(self.head_pooling in POOLINGS, "head_pooling", self.head_pooling, f"expected one of {', '.join(POOLINGS)}")
        check(self.pca_source in PCA_SOURCES, "pca_source", self.pca_source, f"expected one of {', '.join(PCA_SOURCES)}")
        _check_loss(self)
        check(self.whitening in WHITENINGS, "whitening", self.whitening, f"expected one of {', '.join(WHITENINGS)}")
        check(self.whitening != "learned" or self.learned_head, "whitening", self.whitening,
              "the learned head is trained by a loss on descriptors: give a loss other than softmax")
        check(self.pair_tune_steps == 0 or self.whitening == "pairs", "pair_tune_steps", self.pair_tune_steps,
              f"tuning is for the pairs whitening, not {self.whitening}: give whitening pairs, or 0 tuning steps")
        check(self.whitening == "pca" or self.pca_source == "surrogate", "pca_source", self.pca_source,
              "the pairs whitening is fitted on its pairs; pca_source keypoints applies to the pca whitening only")
        for family in FAMILY_RECORDS:
            family.check(getattr(self.transforms, family.name))


_FIELDS = {f.name: f for f in fields(TrainConfig)}

#: check_number's bounds of the numeric settings that depend on no other (None passes where
#: it is the default).
_BOUNDS: dict[str, dict[str, Any]] = {
    "stl10_max_images": {"low": 1, "integer": True},
    "num_classes": {"low": 2, "integer": True},
    **{name: {"low": 1, "integer": True} for name in ("seeds_per_image", "samples_per_class", "epochs", "batch_size", "pca_patches", "val_per_class", "pair_photos", "pair_views")},
    "lr": {"low": 0, "low_open": True},
    "momentum": {"low": 0, "high": 1, "high_open": True},
    "weight_decay": {"low": 0},
    "seed": {"low": 0, "integer": True},
    "num_threads": {"low": 1, "integer": True},
    "checkpoint_minutes": {"low": 0, "low_open": True},
    "time_budget_minutes": {"low": 0, "low_open": True},
    "head_grid": {"low": 1, "integer": True},
    "head_power": {"low": 0, "low_open": True, "high": 1},
    "whiten": {"low": 0, "high": 1},
    "pair_shrinkage": {"low": 0, "high": 1},
    "pair_emphasis": {"low": 0, "high": 1},
    "pair_tune_steps": {"low": 0, "integer": True},
    "pair_temperature": {"low": 0, "low_open": True},
    "pair_noise": {"low": 0},
    "pair_shading": {"low": 0},
    "pair_jpeg": {"low": 1, "high": 95, "integer": True},
    "margin": {"low": 0, "low_open": True, "high": 2},
    "triplet_weight": {"low": 0, "low_open": True},
    "distill_relation": {"low": 0},
    "distill_temperature": {"low": 0, "low_open": True},
    "magnification": {"low": 0, "low_open": True},
    "min_patch_side": {"low": 0},
}


def _check_data(cfg: TrainConfig, data: bool) -> None:
    """Some training data given; with ``data``, the folders hold images, the files are images and the STL-10 file is one."""
    check(bool(cfg.images or cfg.stl10), "images", list(cfg.images), "no training data: give at least one image folder or an STL-10 file")
    for entry in cfg.images if data else ():
        check(Path(entry).exists(), "images", entry, "no such folder or file")
        try:
            gather_images([entry])
        except ValueError as err:
            raise OptionError("images", entry, str(err)) from None
    if cfg.stl10 is not None and data:
        try:
            stl10_image_count(cfg.stl10)
        except (FileNotFoundError, ValueError) as err:
            raise OptionError("stl10", cfg.stl10, str(err)) from None


def _check_loss(cfg: TrainConfig) -> None:
    """A known loss; a triplet loss's batches hold two views of B/2 distinct classes; distill has a teacher of the head's form."""
    check(cfg.loss in LOSSES, "loss", cfg.loss, f"expected one of {', '.join(LOSSES)}")
    check((cfg.teacher is None) != cfg.distills, "teacher", cfg.teacher,
          f"the loss {cfg.loss} needs a teacher model" if cfg.teacher is None else f"a teacher is for the distill losses, not {cfg.loss}")
    if cfg.teacher is not None:
        _, card = load_init_model(cfg.teacher, option="teacher")
        check(card["head"]["dim"] == cfg.head_dim and card["patch_size"] == cfg.patch_size, "teacher", cfg.teacher,
              f"its descriptors are {card['head']['dim']}-D of {card['patch_size']}-pixel patches; the student's are "
              f"{cfg.head_dim}-D of {cfg.patch_size}-pixel patches (head_dim, patch_size)")
    check(cfg.triplet_pairs in TRIPLET_PAIRS, "triplet_pairs", cfg.triplet_pairs, f"expected one of {', '.join(TRIPLET_PAIRS)}")
    if cfg.triplet_pairs == "photos":
        check(cfg.matching, "triplet_pairs", cfg.triplet_pairs, f"photo pairs are for a loss with the triplet term, not {cfg.loss}")
    if cfg.photo_pairs:  # named by the option that asked for the pool
        asked = "triplet_pairs" if cfg.triplet_pairs == "photos" else "distill_photos"
        check(cfg.magnification is not None, asked, getattr(cfg, asked),
              "photo pairs are cut at the descriptor's magnification before training: give magnification")
    for name in ("distill_relation", "distill_photos"):
        check(cfg.distills or not getattr(cfg, name), name, getattr(cfg, name), f"it is for the distill losses, not {cfg.loss}")
    check(cfg.distill_photos or not cfg.distill_cross, "distill_cross", cfg.distill_cross, "it teaches the photo pairs: give distill_photos")
    if cfg.matching or cfg.paired_views:
        check(cfg.batch_size % 2 == 0 and cfg.batch_size >= 4, "batch_size", cfg.batch_size,
              f"loss {cfg.loss} takes batch_size / 2 pairs of views: the batch size must be even and at least 4")
    if cfg.paired_views:
        check(cfg.num_classes >= cfg.batch_size // 2, "num_classes", cfg.num_classes,
              f"loss {cfg.loss} takes batch_size / 2 = {cfg.batch_size // 2} distinct classes per batch: give at least that many")


def _check_arch(cfg: TrainConfig) -> Architecture:
    """The architecture ``arch`` names, checked to be the ``init`` model's or a narrower form of it (:func:`narrows`)."""
    try:
        arch = resolve_architecture(cfg.arch)
    except ValueError as err:
        raise OptionError("arch", cfg.arch, f"{err}; named architectures: {', '.join(ARCHITECTURES)}") from None
    if cfg.init is not None:
        _, card = load_init_model(cfg.init)
        init_arch = architecture_from_dict(card["architecture"])
        check(
            arch == init_arch or narrows(arch, init_arch), "arch", cfg.arch,
            f"the init model {cfg.init} has the architecture {describe_architecture(init_arch)}, neither "
            f"{describe_architecture(arch)} nor a form of it with fewer filters per convolution; leave arch unset "
            "to take the model's",
        )
    return arch
