"""Starting a run from a saved model: its conv trunk, and the architecture it fixes (``TrainConfig.init``)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..checks import OptionError
from ..model_io import load_model
from ..networks import ARCHITECTURES, Architecture, DescriptorNet, ExemplarClassifier, resolve_architecture

logger = logging.getLogger(__name__)

__all__ = ["load_init_model", "architecture_option", "describe_architecture", "init_trunk", "model_settings"]


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


def init_trunk(model: ExemplarClassifier, init: str) -> dict:
    """Copy the conv trunk of the init model into ``model``'s (weights and batch-norm statistics).

    The fully connected layers and the surrogate classifier keep their fresh initialisation
    (a saved descriptor has neither). A saved descriptor keeps the convolutions up to its
    head layer only; later ones, if any, stay fresh too.

    Returns:
        The model card's ``training.init`` record: ``model`` (as given), ``sha256`` of its
        weights file, ``conv_layers`` (how many convolutions were copied, of how many).
    """
    net, card = load_init_model(init)
    copied = len(net.trunk.blocks)
    for block, source in zip(model.trunk.blocks, net.trunk.blocks):
        block.load_state_dict(source.state_dict())
    total = len(model.trunk.blocks)
    if copied < total:
        logger.warning("init model %s keeps %d of %d convolutions (up to its head layer); the others start fresh", init, copied, total)
    logger.info("trunk initialised from %s (sha256 %s...)", init, card["sha256"][:12])
    return {"model": init, "sha256": card["sha256"], "conv_layers": f"{copied} of {total}"}


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
