"""Command line: detect and describe a folder of images into one hloc-layout ``features.h5``.

    python -m exemplar_desc.extract --images DIR --out features.h5 [--descriptor NAME]
        [--max-size PX] [--max-keypoints N] [--magnification sfm|card|M] [--device cpu|cuda]
        [--workers N] [--batch-size N] [--precision auto|fp32|bf16|int8]

Images are read, decoded and detected (OpenCV SIFT/DoG) in ``--workers`` processes,
described on ``--device`` in network batches shared across images, and written as they
are done. The file has the layout of :mod:`exemplar_desc.formats.hloc` (hloc's, keypoints
in original pixels); the SfM command writes the same through the same code
(:mod:`exemplar_desc.extraction`), and at the same magnification unless told otherwise: the
features are for a reconstruction. A re-run copies the images whose file, descriptor and
settings are unchanged; an interrupted run leaves any previous file as it was and no
partial one.

Several processes (``torchrun --nproc_per_node N -m exemplar_desc.extract ...``): rank r
takes images r, r + N, ..., writes them to a part file beside ``--out`` (reusing from the
previous ``--out``), and rank 0 merges the parts into ``--out`` in image order; the file
holds the same as one process writes. The ranks meet through torch.distributed (gloo).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .checks import OptionError, check, check_device, check_number, check_output_file
from .cli import EXIT_BAD_OPTION, ArgumentParser, add_shared_options, flag_names, report
from .distributed import Distributed, DistributedError, close_distributed, init_distributed, rank_from_env
from .extraction import (
    DEFAULT_MAGNIFICATION,
    SFM_MAGNIFICATION,
    ExtractionResult,
    extract_features,
    extract_features_across_ranks,
    resolve_magnification,
    resolve_min_patch_side,
)
from .formats.hloc import OutputConflictError, check_feature_file
from .images import list_images
from .registry import create_descriptor, is_exemplar

__all__ = ["main"]


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m exemplar_desc.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", dest="image_dir", metavar="DIR", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", metavar="FILE", required=True, help="output HDF5 file (hloc layout), e.g. features.h5")
    p.add_argument("--descriptor", default="exemplar",
                   help="exemplar (the shipped default model), exemplar:<model or card path>, sift or rootsift "
                        "(default: %(default)s)")
    p.add_argument("--max-size", type=int, default=None, metavar="PX",
                   help="downscale so the longer side is at most PX (keypoints are stored in original pixels)")
    add_shared_options(
        p, "--max-keypoints", "--magnification", "--device", "--precision", "--dist-timeout",
        max_keypoints={"default": 8192},
        magnification={"type": str, "default": DEFAULT_MAGNIFICATION, "metavar": "sfm|card|M",
                       "help": f"patch side / KeyPoint.size of an Exemplar descriptor: sfm ({SFM_MAGNIFICATION:g} and no "
                               "smallest patch side, the SfM command's), card (the model card's) or a number, with the "
                               "card's smallest patch side (default: %(default)s)"},
    )
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="processes that read, decode and detect, 0 for none (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="patches per network batch, shared across images (default: 1024 on the CPU, 8192 on CUDA)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another descriptor and extract every image again")
    p.add_argument("--verbose", action="store_true", help="log skipped images and reuse decisions")
    return p


def _check_options(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Check every option and path before any work; returns the output file and the image names."""
    exemplar = is_exemplar(args.descriptor)
    if args.max_size is not None:
        check_number("max_size", args.max_size, low=16, integer=True)
    check_number("max_keypoints", args.max_keypoints, low=1, integer=True)
    check_number("workers", args.workers, low=0, integer=True)
    check_device("device", args.device)
    check_number("dist_timeout", args.dist_timeout, low=0, low_open=True)
    if args.batch_size is not None:
        check(exemplar, "batch_size", args.batch_size, "only applies to an Exemplar descriptor")
        check_number("batch_size", args.batch_size, low=1, integer=True)
    check(exemplar or args.precision == "auto", "precision", args.precision, "only applies to an Exemplar descriptor")
    check(exemplar or args.magnification == DEFAULT_MAGNIFICATION, "magnification", args.magnification,
          "only applies to an Exemplar descriptor")
    resolve_magnification(args.magnification)
    out = check_output_file("out", args.out)
    try:
        names = list_images(args.image_dir)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError("image_dir", args.image_dir, str(err)) from None
    if not args.overwrite:
        check_feature_file(out, args.descriptor)
    return out, names


def _descriptor(args: argparse.Namespace, device: torch.device) -> Any:
    """The descriptor of ``--descriptor`` on ``device``."""
    kwargs = {}
    if is_exemplar(args.descriptor):
        kwargs = {"magnification": resolve_magnification(args.magnification),
                  "min_patch_side": resolve_min_patch_side(args.magnification),
                  "batch_size": args.batch_size or (8192 if device.type == "cuda" else 1024), "precision": args.precision}
    try:
        return create_descriptor(args.descriptor, device=str(device), **kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError("descriptor", args.descriptor, str(err)) from None


def _extract(args: argparse.Namespace, names: list[str], out: Path, descriptor: Any, dist: Distributed | None) -> ExtractionResult:
    """Extract into ``out``; under torchrun each rank a share into a part file beside it, merged by rank 0."""
    common = {"max_size": args.max_size, "max_keypoints": args.max_keypoints, "reuse": not args.overwrite,
              "workers": args.workers}
    descriptors, paths = {args.descriptor: descriptor}, {args.descriptor: out}
    if dist is None:
        return extract_features(args.image_dir, names, descriptors, paths, **common)

    def parts(rank: int) -> dict[str, Path]:
        return {args.descriptor: out.with_name(f".{out.name}.part{rank}of{dist.world_size}")}

    result = extract_features_across_ranks(dist, args.image_dir, names, descriptors, parts, paths,
                                           previous_paths=paths, **common)
    if dist.is_main:
        for rank in range(dist.world_size):
            Path(parts(rank)[args.descriptor]).unlink(missing_ok=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0: written, 2: bad option or output, before any work)."""
    parser = _parser()
    args = parser.parse_args(argv)
    main_rank = rank_from_env() == 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            out, names = _check_options(args)
            dist = init_distributed(args.device, args.dist_timeout)  # None without torchrun
            descriptor = _descriptor(args, dist.device if dist is not None else check_device("device", args.device))
        except (ValueError, OutputConflictError) as err:  # checked before any work
            if isinstance(err, OutputConflictError):
                err = OutputConflictError(f"{err} ({flag_names(parser)['overwrite']})")
            return report(err, parser) if main_rank else EXIT_BAD_OPTION  # every rank checks; one says so
        result = _extract(args, names, out, descriptor, dist)
    except DistributedError as err:
        if main_rank:
            print("error:", " ".join(str(err).split()), file=sys.stderr)
        return 1
    finally:
        close_distributed()
    if not main_rank:
        return 0
    counts = result.num_keypoints[args.descriptor]
    print(f"{len(result.names)} images ({len(result.reused)} reused, {len(result.skipped)} skipped), "
          f"{sum(counts.values())} keypoints -> {out}")
    for name, why in result.skipped.items():
        print(f"  skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
