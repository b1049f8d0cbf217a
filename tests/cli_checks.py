"""The assertion shared by the command lines' bad-option tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_bad_option(main: Callable[[Sequence[str]], int], argv: Sequence[str], option: str, value: str,
                      capsys, watched: Path) -> None:
    """Run ``main(argv)`` and check how it refuses a bad option.

    Exit status 2 (returned, or argparse's SystemExit), exactly one stderr line, starting with
    ``error:`` and naming ``option`` and ``value`` (as typed, or as the float it parsed to), no
    traceback, nothing on stdout, nothing changed under ``watched``, within 10 s.
    """
    before = _tree(watched)
    start = time.perf_counter()
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own errors (malformed values, unknown choices)
        code = exit_.code
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    try:
        shown = {value, str(float(value))}
    except ValueError:
        shown = {value}
    assert option in lines[0] and any(v in lines[0] for v in shown), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert _tree(watched) == before  # no output folder made, existing outputs unchanged
    assert seconds < 10
