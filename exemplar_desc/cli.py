"""What every command line of the package shares: its parser, its shared options, its errors.

A bad option or path ends a command with one line on stderr, ``error: OPTION VALUE: what
is allowed``, and exit status 2, before anything is computed or written. Library code
raises :class:`~exemplar_desc.checks.OptionError` naming the argument or field it checked;
:func:`report` prints it under the flag that sets that field, read from the parser itself,
so no second table of flag names exists.

Options that several commands take (``--device``, ``--precision``, ``--magnification``,
``--max-keypoints``, ``--dist-timeout``) are declared once, in :data:`SHARED_OPTIONS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, NoReturn

from .checks import OptionError
from .descriptor import PRECISION_CHOICES
from .distributed import DEFAULT_TIMEOUT_MINUTES

__all__ = ["ArgumentParser", "EXIT_BAD_OPTION", "SHARED_OPTIONS", "add_shared_options", "flag_names", "report", "settings_from_args"]

EXIT_BAD_OPTION = 2

#: The options several command lines share: flag -> argparse keywords. A command may
#: override any keyword (a default, a help text) in :func:`add_shared_options`.
SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "--device": {"default": "cpu", "help": "torch device of the network: cpu, cuda or cuda:N (default: %(default)s)"},
    "--precision": {
        "default": "auto",
        "choices": PRECISION_CHOICES,
        "help": "network convolutions in float32, bfloat16 or int8 (x86 CPUs with AVX2; the model card's "
                "calibration); auto: int8 on those CPUs for a calibrated model, else bfloat16 where the CPU or GPU "
                "has it in hardware, else float32 (default: %(default)s)",
    },
    "--magnification": {
        "type": float,
        "metavar": "M",
        "help": "patch side / KeyPoint.size of an Exemplar descriptor (default: the model card's)",
    },
    "--max-keypoints": {"type": int, "metavar": "N", "help": "SIFT keypoints per image, strongest first (default: %(default)s)"},
    "--dist-timeout": {
        "type": float,
        "default": DEFAULT_TIMEOUT_MINUTES,
        "metavar": "MINUTES",
        "help": "under torchrun: minutes a rank waits for the others before the job fails (default: %(default)s)",
    },
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a malformed command line as one ``error:`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_OPTION, f"error: {message} (see {self.prog} --help)\n")


def add_shared_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **overrides: dict[str, Any]) -> None:
    """Add options of :data:`SHARED_OPTIONS` to ``parser``.

    Args:
        flags: e.g. ``"--device", "--precision"``.
        overrides: per option, by its destination (``max_keypoints={"default": 4000}``),
            keywords that replace the shared ones.
    """
    for flag in flags:
        dest = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, **{**SHARED_OPTIONS[flag], **overrides.get(dest, {})})


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each destination of ``parser`` and the flag (or the positional's metavar) the user types for it."""
    names = {}
    for action in parser._actions:
        if action.option_strings:
            names[action.dest] = max(action.option_strings, key=len)
        else:
            names[action.dest] = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return names


def settings_from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """The dataclass ``cls`` from ``given`` and, for its other fields, the parsed options of the same destination.

    Fields without an option keep their defaults, so a command maps its flags to settings
    by their destinations alone.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})


def report(err: Exception, parser: argparse.ArgumentParser | None = None) -> int:
    """Print ``error: <err>`` on stderr, an :class:`OptionError` under the flag of ``parser`` that sets its field.

    Returns:
        The exit status for a bad option (2).
    """
    if isinstance(err, OptionError) and parser is not None:
        flag = flag_names(parser).get(err.option)
        if flag is not None:
            err = OptionError(flag, err.value, err.allowed)
    print(f"error: {err}", file=sys.stderr)
    return EXIT_BAD_OPTION
