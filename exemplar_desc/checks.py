"""Checks of arguments and settings, made before any work; a bad one raises :class:`OptionError`.

Library code names the argument or configuration field it checks (``"lr"``,
``"magnification"``); the command lines (:mod:`exemplar_desc.cli`) turn the name into the
flag the user typed and print one ``error:`` line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["OptionError", "check", "check_number", "check_device", "check_output_dir", "check_output_file"]


class OptionError(ValueError):
    """A bad option value or path, named in the message."""

    def __init__(self, option: str, value: Any, allowed: str) -> None:
        super().__init__(f"{option} {value!r}: {allowed}")
        self.option, self.value, self.allowed = option, value, allowed

    def __reduce__(self):
        # Distributed runs send a rank's error to the others by pickling it.
        return type(self), (self.option, self.value, self.allowed)


def check(condition: bool, option: str, value: Any, allowed: str) -> None:
    """Raise :class:`OptionError` unless ``condition`` holds."""
    if not condition:
        raise OptionError(option, value, allowed)


def check_number(
    option: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Check that ``value`` is a finite number (a whole one with ``integer``) within bounds.

    Args:
        option: the argument's or field's name (``"head_grid"``); a command line gives its flag.
        value: the parsed value; ``bool`` is not accepted as a number.
        low, high: bounds, inclusive unless ``low_open`` / ``high_open``; None for none.
        integer: require a whole number.
    """
    kind = "a whole number" if integer else "a finite number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        raise OptionError(option, value, f"must be {kind}" + (f" {' and '.join(bounds)}" if bounds else ""))


def check_device(option: str, name: str, allow_auto: bool = False) -> torch.device | None:
    """Parse a torch device name and check that it exists here.

    Returns:
        The device, or None for ``"auto"`` when ``allow_auto``.
    """
    if allow_auto and name == "auto":
        return None
    allowed = ("auto, " if allow_auto else "") + "cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(option, name, f"not a device; use {allowed}") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(option, name, f"unsupported device type; use {allowed}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(option, name, "CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(option, name, f"only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(option: str, path: str | os.PathLike) -> Path:
    """Check that ``path`` is, or can be created as, a writable folder (nothing is created).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(option, str(path), "exists and is not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OptionError(option, str(path), f"{base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OptionError(option, str(path), f"{base} is not writable")
    return path


def check_output_file(option: str, path: str | os.PathLike) -> Path:
    """Check that ``path`` can be written as a file: not a folder, its folder creatable and writable.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if path.is_dir():
        raise OptionError(option, str(path), "is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(option, str(path), "exists and is not writable")
    check_output_dir(option, path.parent)
    return path
