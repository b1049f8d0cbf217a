"""Command line: export a descriptor model to a file that runs without torch.

    python -m exemplar_desc.export --format onnx --out exemplar.onnx [--model NAME]

The ONNX file maps (N, 1, P, P) float32 grey patches in [0, 1] to (N, D) unit-length
descriptors, the per-patch standardisation included (:mod:`exemplar_desc.onnx_export`);
OpenCV reads it with ``cv2.dnn.readNetFromONNX``. Its metadata_props hold the model name,
the sha256 of its weights, the magnification and the patch size. Cutting the patches as
``ExemplarDescriptor.compute`` does, in Python and C++: docs/onnx.md. The file is written
atomically; an existing one is replaced.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Sequence

from .checks import OptionError, check, check_output_file
from .cli import ArgumentParser, report
from .model_io import DEFAULT_MODEL
from .onnx_export import GEOMETRY_KEYS, OnnxDescriptorGraph, export_onnx

__all__ = ["main", "FORMATS"]

#: What ``--format`` accepts, with the file suffix each one needs.
FORMATS = {"onnx": ".onnx"}


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m exemplar_desc.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="file format: onnx (read by cv2.dnn.readNetFromONNX)")
    p.add_argument("--out", metavar="FILE", required=True, help="file to write, e.g. exemplar.onnx (replaced if it exists)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"shipped model name or a model card (.json) or weights (.pt) path (default: {DEFAULT_MODEL})")
    p.add_argument("--verbose", action="store_true", help="log the export")
    return p


def _check_options(args: argparse.Namespace) -> tuple[Path, OnnxDescriptorGraph]:
    """Check the output path and load the model (fast) before any work; returns the path and the graph to export."""
    out = check_output_file("out", args.out)
    suffix = FORMATS[args.format]
    check(out.suffix.lower() == suffix, "out", args.out, f"must end with {suffix} for --format {args.format}")
    try:
        importlib.import_module("onnx")  # needed by the export; a missing package is reported before any work
    except ImportError:
        raise OptionError("format", args.format, "needs the onnx package: pip install 'exemplar_desc[onnx]'") from None
    try:
        return out, OnnxDescriptorGraph(args.model)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError("model", args.model or DEFAULT_MODEL, str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0: written, 2: bad option or output, before any work)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out, graph = _check_options(args)
    except ValueError as err:
        return report(err, parser)
    metadata = export_onnx(graph, out)
    geometry = ", ".join(f"{key} {metadata[key]}" for key in GEOMETRY_KEYS)
    print(f"{metadata['model']} ({geometry}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
