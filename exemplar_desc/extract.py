"""Command line: detect and describe a folder of images into one hloc-layout ``features.h5``.

    python -m exemplar_desc.extract --images DIR --out features.h5 [--descriptor NAME]
        [--max-size PX] [--max-keypoints N] [--device cpu|cuda] [--workers N] [--batch-size N] [--precision auto|fp32|bf16]

Images are read, decoded and detected (OpenCV SIFT/DoG) in ``--workers`` processes,
described on ``--device`` in network batches shared across images, and written as they
are done. The file has the layout of :mod:`exemplar_desc.sfm.features` (hloc's, keypoints
in original pixels); the SfM command line writes the same through the same code. A re-run
copies the images whose file, descriptor and settings are unchanged; an interrupted run
leaves any previous file as it was and no partial one.

Several processes (``torchrun --nproc_per_node N -m exemplar_desc.extract ...``): rank r
takes images r, r + N, ..., writes them to a part file beside ``--out`` (reusing from the
previous ``--out``), and rank 0 merges the parts into ``--out`` in image order; the file
holds the same as one process writes. The ranks meet through torch.distributed (gloo).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from .registry import create_descriptor, is_exemplar
from .cli import EXIT_BAD_OPTION, ArgumentParser, report
from .checks import OptionError, check, check_device, check_number, check_output_file
from .descriptor import PRECISION_CHOICES
from .images import list_images
from .distributed import DEFAULT_TIMEOUT_MINUTES, DistributedError, close_distributed, init_distributed, rank_from_env
from .sfm.features import OutputConflictError, check_feature_file, extract_features, extract_features_across_ranks

__all__ = ["main"]


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m exemplar_desc.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output HDF5 file (hloc layout), e.g. features.h5")
    p.add_argument("--descriptor", default="exemplar",
                   help="exemplar (the shipped default model), exemplar:<model or card path>, sift or rootsift "
                        "(default: %(default)s)")
    p.add_argument("--max-size", type=int, default=None, metavar="PX",
                   help="downscale so the longer side is at most PX (keypoints are stored in original pixels)")
    p.add_argument("--max-keypoints", type=int, default=8192, metavar="N", help="per image (default: %(default)s)")
    p.add_argument("--magnification", type=float, default=None, metavar="M",
                   help="patch side / KeyPoint.size of an Exemplar descriptor (default: the model card's)")
    p.add_argument("--device", default="cpu", help="torch device of an Exemplar descriptor: cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="processes that read, decode and detect, 0 for none (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="patches per network batch, shared across images (default: 1024 on the CPU, 8192 on CUDA)")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="Exemplar convolutions in float32 or bfloat16; auto: bfloat16 where the device has it in hardware "
                        "(default: %(default)s)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES, metavar="MINUTES",
                   help="under torchrun: minutes a rank waits for the others before the job fails (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another descriptor and extract every image again")
    p.add_argument("--verbose", action="store_true", help="log skipped images and reuse decisions")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0: written, 2: bad option or output, before any work)."""
    args = _parser().parse_args(argv)
    main_rank = rank_from_env() == 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    exemplar = is_exemplar(args.descriptor)
    try:
        try:
            if args.max_size is not None:
                check_number("--max-size", args.max_size, low=16, integer=True)
            check_number("--max-keypoints", args.max_keypoints, low=1, integer=True)
            check_number("--workers", args.workers, low=0, integer=True)
            check_device("--device", args.device)
            check_number("--dist-timeout", args.dist_timeout, low=0, low_open=True)
            if args.batch_size is not None:
                check(exemplar, "--batch-size", args.batch_size, "only applies to an Exemplar descriptor")
                check_number("--batch-size", args.batch_size, low=1, integer=True)
            check(exemplar or args.precision == "auto", "--precision", args.precision, "only applies to an Exemplar descriptor")
            if args.magnification is not None:
                check(exemplar, "--magnification", args.magnification, "only applies to an Exemplar descriptor")
                check_number("--magnification", args.magnification, low=0, low_open=True)
            out = check_output_file("--out", args.out)
            try:
                names = list_images(args.images)
            except (FileNotFoundError, ValueError) as err:
                raise OptionError("--images", args.images, str(err)) from None
            if not args.overwrite:
                check_feature_file(out, args.descriptor)
            dist = init_distributed(args.device, args.dist_timeout)  # None without torchrun
            device = dist.device if dist is not None else check_device("--device", args.device)
            kwargs = {}
            if exemplar:
                batch_size = args.batch_size or (8192 if device.type == "cuda" else 1024)
                kwargs = {"magnification": args.magnification, "batch_size": batch_size, "precision": args.precision}
            try:
                descriptor = create_descriptor(args.descriptor, device=str(device), **kwargs)
            except (FileNotFoundError, ValueError) as err:
                raise OptionError("--descriptor", args.descriptor, str(err)) from None
        except (ValueError, OutputConflictError) as err:  # checked before any work
            return report(err) if main_rank else EXIT_BAD_OPTION  # every rank checks; one says so
        common = {"max_size": args.max_size, "max_keypoints": args.max_keypoints, "reuse": not args.overwrite,
                  "workers": args.workers}
        descriptors, paths = {args.descriptor: descriptor}, {args.descriptor: out}
        if dist is None:
            result = extract_features(args.images, names, descriptors, paths, **common)
        else:

            def parts(rank: int) -> dict[str, Path]:
                return {args.descriptor: out.with_name(f".{out.name}.part{rank}of{dist.world_size}")}

            result = extract_features_across_ranks(dist, args.images, names, descriptors, parts, paths,
                                                   previous_paths=paths, **common)
            if main_rank:
                for rank in range(dist.world_size):
                    Path(parts(rank)[args.descriptor]).unlink(missing_ok=True)
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
