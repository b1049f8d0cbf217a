"""Every descriptor of the package by name: ``exemplar[:<model>]``, ``sift``, ``rootsift``.

The command lines, the SfM pipeline, the extractor and the benchmarks build their
descriptors here, so a name means the same everywhere.
"""

from __future__ import annotations

import cv2

from .baselines import RootSIFT
from .checks import OptionError, check
from .descriptor import ExemplarDescriptor
from .model_io import resolve_card_path

__all__ = ["DESCRIPTOR_NAMES", "create_descriptor", "is_exemplar", "check_descriptor_name"]

DESCRIPTOR_NAMES = ("exemplar", "sift", "rootsift")


def create_descriptor(name: str, device: str = "cpu", **kwargs):
    """Build a descriptor by name.

    Args:
        name: ``"sift"`` (OpenCV SIFT), ``"rootsift"``, ``"exemplar"`` (the shipped default
            model) or ``"exemplar:<model>"`` (a shipped model name or a weights path).
        device: torch device for the Exemplar models.
        kwargs: passed to the constructor (e.g. ``nfeatures`` for SIFT's detector).

    Returns:
        An object with OpenCV's Feature2D methods (detect, compute, detectAndCompute, ...).
    """
    if name == "sift":
        return cv2.SIFT_create(**kwargs)
    if name == "rootsift":
        return RootSIFT(**kwargs)
    if is_exemplar(name):
        model = name.split(":", 1)[1] if ":" in name else None
        return ExemplarDescriptor(model=model, device=device, **kwargs)
    raise ValueError(f"unknown descriptor {name!r}; available: {', '.join(DESCRIPTOR_NAMES)} or exemplar:<model>")


def is_exemplar(name: str) -> bool:
    """Whether a descriptor name of :func:`create_descriptor` is an Exemplar model (``exemplar`` or ``exemplar:<model>``)."""
    return name == "exemplar" or name.startswith("exemplar:")


def check_descriptor_name(option: str, name: str) -> None:
    """Check a name for :func:`create_descriptor` without building anything: ``sift``,
    ``rootsift``, ``exemplar`` or ``exemplar:<model>`` with a shipped model name or a
    card/weights path that exists.

    Args:
        option: the argument or field the name came from (e.g. ``"compare"``), named by the
            error; a command line gives its flag.
        name: the descriptor name.

    Raises:
        OptionError: naming ``option``, the name and what is allowed.
    """
    allowed = f"must be {', '.join(DESCRIPTOR_NAMES)} or exemplar:<model>"
    check(isinstance(name, str) and bool(name), option, name, allowed)
    if name.startswith("exemplar:"):
        try:
            resolve_card_path(name.split(":", 1)[1])
        except FileNotFoundError as err:
            raise OptionError(option, name, str(err)) from None
    else:
        check(name in DESCRIPTOR_NAMES, option, name, allowed)
