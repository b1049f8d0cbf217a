"""Starting a run from a saved model: its conv trunk, and the architecture it fixes (``TrainConfig.init``)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from ..checks import OptionError
from ..model_io import load_model
from ..networks import ARCHITECTURES, Architecture, DescriptorNet, ExemplarClassifier, resolve_architecture

logger = logging.getLogger(__name__)

__all__ = ["load_init_model", "architecture_option", "describe_architecture", "narrows", "kept_channels", "head_rows", "init_trunk",
           "model_settings"]


def load_init_model(model: str, option: str = "init") -> tuple[DescriptorNet, dict]:
    """The init (or teacher) model (shipped name or ``.pt``/``.json`` path), its sha256 verified, on the CPU.

    Args:
        option: the setting that named it, for the error.

    Returns:
        (network, model card), as :func:`exemplar_desc.model_io.load_model` returns them.

    Raises:
        OptionError (``option``): unknown name, missing file, or a corrupt or malformed model.
    """
    try:
        with torch.random.fork_rng(devices=[]):  # building the network draws random weights: leave the caller's stream alone
            return load_model(model)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError(option, model, str(err)) from None


def architecture_option(arch: Architecture) -> str | None:
    """The ``TrainConfig.arch`` value that gives ``arch``: its name in ARCHITECTURES, else its notation; None when neither does."""
    for name in (*ARCHITECTURES, arch.spec):
        if resolve_architecture(name) == arch:
            return name
    return None


def describe_architecture(arch: Architecture) -> str:
    """``arch`` in words: notation, pooling and batch norm."""
    return f"{arch.spec} (pool after {arch.pool_after}, batch norm {'on' if arch.batch_norm else 'off'})"


def narrows(arch: Architecture, init: Architecture) -> bool:
    """Whether ``arch`` is ``init`` with as many or fewer filters in some convolutions (batch norm on, same
    kernels, strides, pooling and fully connected layers): a run of ``arch`` can start from ``init``'s trunk."""
    same_layout = (len(arch.convs) == len(init.convs) and arch.fcs == init.fcs and arch.pool_after == init.pool_after
                   and arch.batch_norm == init.batch_norm)
    return same_layout and arch.batch_norm and all(
        (k, s) == (ki, si) and f <= fi for (f, k, s), (fi, ki, si) in zip(arch.convs, init.convs))


def _mean_relu(bn: nn.BatchNorm2d, power: float) -> torch.Tensor:
    """(C,) E[ReLU(gamma z + beta) ** power] for z ~ N(0, 1), power 1 or 2: a channel's activation under its batch
    norm, in closed form (0 for a channel that its bias keeps below zero)."""
    s, m = bn.weight.detach().abs().double().clamp_min(1e-12), bn.bias.detach().double()
    cdf, pdf = 0.5 * (1 + torch.erf(m / s / math.sqrt(2))), torch.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi)
    return m * cdf + s * pdf if power == 1 else (m**2 + s**2) * cdf + m * s * pdf


def kept_channels(net: DescriptorNet, widths: list[int]) -> list[torch.Tensor]:
    """Per convolution of ``net``'s trunk, the sorted (widths[i],) int64 indices of the output channels a narrower
    trunk keeps: all where the width is the same, else those of most weight downstream, a channel's expected
    activation (:func:`_mean_relu`) times the norm of the weights that read it (the next convolution's; for the
    head's layer, the head projection's rows, of power-compressed features)."""
    blocks, kept = net.trunk.blocks, []
    for i, (block, width) in enumerate(zip(blocks, widths)):
        if width == block[0].out_channels:
            kept.append(torch.arange(width))
            continue
        if i + 1 < len(blocks):
            weight = _mean_relu(block[1], 2).sqrt() * blocks[i + 1][0].weight.detach().double().square().sum((0, 2, 3)).sqrt()
        else:
            rows = net.head.projection.detach().double().view(block[0].out_channels, -1).square().sum(1).sqrt()
            weight = _mean_relu(block[1], 1) ** net.head.power * rows
        kept.append(torch.argsort(weight, descending=True)[:width].sort().values)
    return kept


def head_rows(channels: torch.Tensor, grid: int) -> torch.Tensor:
    """(C * grid * grid,) rows of a :class:`DescriptorHead`'s mean and projection (channel-major) that read ``channels``."""
    return (channels[:, None] * grid * grid + torch.arange(grid * grid)).flatten()


def init_trunk(model: ExemplarClassifier, init: str) -> dict:
    """Copy the conv trunk of the init model into ``model``'s (weights and batch-norm statistics).

    The fully connected layers and the surrogate classifier keep their fresh initialisation
    (a saved descriptor has neither). A saved descriptor keeps the convolutions up to its
    head layer only; later ones, if any, stay fresh too. A narrower ``model``
    (:func:`narrows`) takes, in each convolution, the init's channels of most weight downstream
    (:func:`kept_channels`) and their inputs among the channels kept before.

    Returns:
        The model card's ``training.init`` record: ``model`` (as given), ``sha256`` of its
        weights file, ``conv_layers`` (how many convolutions were copied, of how many), and for
        a narrower model ``channels_kept`` (per convolution, as "kept of init's").
    """
    net, card = load_init_model(init)
    copied = len(net.trunk.blocks)
    widths = [block[0].out_channels for block in model.trunk.blocks[:copied]]
    sources = [block[0].out_channels for block in net.trunk.blocks]
    kept = kept_channels(net, widths)
    inputs = torch.arange(net.trunk.blocks[0][0].in_channels)
    for block, source, outputs in zip(model.trunk.blocks, net.trunk.blocks, kept):
        state = {k: v[outputs] if v.ndim else v for k, v in source.state_dict().items()}  # the batch norm's step count: ()
        state["0.weight"] = state["0.weight"][:, inputs]
        block.load_state_dict(state)
        inputs = outputs
    total = len(model.trunk.blocks)
    if copied < total:
        logger.warning("init model %s keeps %d of %d convolutions (up to its head layer); the others start fresh", init, copied, total)
    logger.info("trunk initialised from %s (sha256 %s...)", init, card["sha256"][:12])
    record = {"model": init, "sha256": card["sha256"], "conv_layers": f"{copied} of {total}"}
    if widths != sources:
        record["channels_kept"] = [f"{w} of {s}" for w, s in zip(widths, sources)]
        logger.info("channels kept per convolution: %s", ", ".join(record["channels_kept"]))
    return record


#: Keys of a model card's ``head`` and the TrainConfig fields they set.
_HEAD_FIELDS = {"layer": "head_layer", "grid": "head_grid", "dim": "head_dim", "power": "head_power", "pooling": "head_pooling",
                "whiten": "whiten", "whitening": "whitening", "pca_patches": "pca_patches", "pca_source": "pca_source"}


def model_settings(card: dict) -> dict[str, Any]:
    """TrainConfig settings that give a new model a saved model's descriptor: its head and magnification.

    A run with them on a model's trunk (``init``) fits the same form of head (layer, grid,
    dimension, power, pooling), the same way (whitening, patches, the pairs' views, shrinkage, emphasis and tuning),
    and describes patches of the same size, so the two models compare like for like.

    Args:
        card: the model's card (:func:`load_init_model`); keys older cards lack keep TrainConfig's defaults.
    """
    head = card["head"]
    settings = {field: head[key] for key, field in _HEAD_FIELDS.items() if head.get(key) is not None}
    settings.setdefault("head_power", 1.0)  # as load_model builds a card without it
    settings.setdefault("whitening", "pca")  # cards older than the pairs whitening
    pairs = head.get("pairs") or {}
    if "views_per_photo" in pairs:
        settings.update(pair_views=pairs["views_per_photo"], pair_shrinkage=pairs["shrinkage"],
                        pair_noise=pairs.get("noise", 0.0), pair_jpeg=pairs.get("jpeg"),
                        pair_shading=pairs.get("shading", 0.0))
    # A head without them (another whitening, or a card older than the options) had neither: 0, whatever a preset says.
    tune = pairs.get("tune") or {}
    settings["pair_emphasis"] = pairs.get("emphasis", 0.0)
    settings["pair_tune_steps"] = tune.get("steps", 0)
    if tune:
        settings["pair_temperature"] = tune["temperature"]
    settings["magnification"] = float(card["magnification"])
    settings["min_patch_side"] = float(card["min_patch_side"])
    return settings
