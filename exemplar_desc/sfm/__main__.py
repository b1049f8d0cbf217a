"""Command line: structure from motion with exemplar_desc features and COLMAP's mapper.

    python -m exemplar_desc.sfm --images DIR --out DIR [--descriptor exemplar|sift|rootsift]
        [--pairs exhaustive|sequential:K] [--max-size PX] [--device cpu|cuda] [--compare sift]

    torchrun --nproc_per_node N -m exemplar_desc.sfm ...   (the same, extraction and matching on N processes)

See :mod:`exemplar_desc.sfm.pipeline` for the outputs, docs/sfm.md and docs/distributed-sfm.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from ..checks import OptionError, check_number
from ..cli import EXIT_BAD_OPTION, ArgumentParser, add_shared_options, flag_names, report, settings_from_args
from ..distributed import DistributedError, close_distributed, init_distributed, rank_from_env
from ..extraction import DEFAULT_MAGNIFICATION, SFM_MAGNIFICATION, resolve_magnification, resolve_min_patch_side
from ..formats.hloc import OutputConflictError
from .pipeline import SfmError, SfmSettings, expand_compare, run_sfm
from .reconstruction import MapperSettings

__all__ = ["main"]


def _ratio(text: str) -> float | str | None:
    # Range and finiteness are checked by SfmSettings, so the error names --ratio like the others.
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], 'auto' or 'off', got {text!r}") from err


def _parser() -> ArgumentParser:
    """The options; each destination is an argument of :func:`run_sfm` or a field of its settings."""
    defaults, mapper = SfmSettings(), MapperSettings()
    p = ArgumentParser(prog="python -m exemplar_desc.sfm", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", dest="image_dir", metavar="DIR", required=True, help="folder of photos (searched recursively)")
    p.add_argument("--out", dest="out_dir", metavar="DIR", required=True, help="output folder (features.h5, matches.h5, pairs.txt, database.db, sparse/, summary.json; manifest.json, written last, lists the set)")
    p.add_argument("--descriptor", default="exemplar", help="sift, rootsift, exemplar or exemplar:<model> (default: %(default)s)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME",
                   help="also run NAME on the same keypoints and print a side-by-side table; 'sift' means SIFT and "
                        "RootSIFT; repeatable; outputs go to OUT/<descriptor>/")
    p.add_argument("--pairs", default=defaults.pairs, help="exhaustive or sequential:K (default: %(default)s)")
    p.add_argument("--max-size", type=int, default=None, metavar="PX",
                   help="downscale so the longer side is at most PX for extraction (keypoints are stored at full resolution)")
    add_shared_options(p, "--max-keypoints", max_keypoints={"default": defaults.max_keypoints})
    p.add_argument("--ratio", type=_ratio, default=defaults.ratio, metavar="R",
                   help="Lowe ratio test on top of mutual nearest neighbours for every descriptor, a number in (0, 1] "
                        "or 'off'; auto: 0.95 for Exemplar descriptors, off for SIFT and RootSIFT (default: %(default)s)")
    p.add_argument("--focal-length", type=float, default=None, metavar="PX",
                   help="focal length prior in pixels of the original images for every camera (default: EXIF)")
    add_shared_options(
        p, "--magnification", "--precision", "--device", "--dist-timeout",
        magnification={"type": str, "default": DEFAULT_MAGNIFICATION, "metavar": "sfm|card|M",
                       "help": f"patch side / KeyPoint.size of Exemplar descriptors: sfm ({SFM_MAGNIFICATION:g} and no "
                               "smallest patch side, for precisely placed matches), card (the model card's) or a number, "
                               "with the card's smallest patch side (default: %(default)s)"},
        device={"default": defaults.device,
                "help": "torch device for descriptors and matching, cpu or cuda; under torchrun each rank uses "
                        "cuda:LOCAL_RANK with cuda (default: %(default)s)"},
    )
    g = p.add_argument_group("incremental mapper (COLMAP's defaults: 10, 100, 30, 15)")
    g.add_argument("--min-model-size", type=int, default=mapper.min_model_size, help="smallest model kept, in images (default: %(default)s)")
    g.add_argument("--init-min-num-inliers", type=int, default=mapper.init_min_num_inliers,
                   help="verified inliers an initial image pair needs (default: %(default)s)")
    g.add_argument("--abs-pose-min-num-inliers", type=int, default=mapper.abs_pose_min_num_inliers,
                   help="2D-3D inliers needed to register an image (default: %(default)s)")
    g.add_argument("--min-num-matches", type=int, default=mapper.min_num_matches, help="verified matches for a pair to count (default: %(default)s)")
    g.add_argument("--single-model", dest="multiple_models", action="store_false",
                   help="stop after the first model instead of starting new ones")
    g.add_argument("--one-pass", dest="two_pass", action="store_false",
                   help="refine the radial distortion from the first image pair on, as COLMAP does, instead of mapping "
                        "with it fixed first and refining it while continuing the largest model")
    g.add_argument("--seed", type=int, default=mapper.seed, help="random seed of COLMAP's verification RANSAC and mapper, -1 for none (default: %(default)s)")
    g.add_argument("--num-threads", type=int, default=mapper.num_threads,
                   help="mapper threads, -1 for all cores (default: %(default)s); only 1 makes a seeded run exactly repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of another descriptor or program (and re-extract every image)")
    p.add_argument("--export-colmap", action="store_true", help="also write OUT/colmap_features/<image>.txt for `colmap feature_importer`")
    p.add_argument("--verbose", action="store_true", help="show COLMAP's own log")
    return p


def _settings(args: argparse.Namespace) -> SfmSettings:
    """The settings the options give, a named magnification resolved to its patch geometry."""
    return settings_from_args(SfmSettings, args, mapper=settings_from_args(MapperSettings, args),
                              magnification=resolve_magnification(args.magnification),
                              min_patch_side=resolve_min_patch_side(args.magnification))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_summary(summaries: dict[str, dict[str, Any]], parser: argparse.ArgumentParser) -> None:
    flags = flag_names(parser)
    first = next(iter(summaries.values()))
    print(f"images: {first['images_found']} found, {first['images_readable']} readable, "
          f"{len(first['images_skipped'])} skipped, {first['images_reused']} with reused features")
    for name, why in first["images_skipped"].items():
        print(f"  skipped {name}: {why}")
    header = f"{'descriptor':<12} {'registered':>10} {'points3D':>9} {'track len':>9} {'reproj px':>9} {'sigma px':>8} {'models':>6} {'verified':>8} {'seconds':>8}"
    print(header)
    for name, s in summaries.items():
        print(f"{name:<12} {s['images_registered']:>6}/{s['images_readable']:<3} {s['points3D']:>9} "
              f"{_fmt(s['mean_track_length'], '.2f'):>9} {_fmt(s['mean_reprojection_error'], '.3f'):>9} "
              f"{_fmt(s['observation_sigma'], '.3f'):>8} "
              f"{s['num_models']:>6} {s['verified_pairs']:>4}/{s['pairs']:<3} {s['seconds']['total']:>8.1f}")
    for name, s in summaries.items():
        print(f"{name}: seconds " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
        for m in s["models"]:
            print(f"  model {m['index']}: {m['images_registered']} images, {m['points3D']} points, "
                  f"track {m['mean_track_length']:.2f}, reproj {m['mean_reprojection_error']:.3f} px, "
                  f"sigma {_fmt(m['observation_sigma'], '.3f')} px -> {m['path']}")
        if s["images_not_registered"]:
            print(f"  not registered: {' '.join(s['images_not_registered'])}")
        if "message" in s:  # it names the mapper's settings, set by these options
            print(f"  {s['message']} ({flags['init_min_num_inliers']}, {flags['min_model_size']})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status.

    0: at least one model; 1: input that gives no reconstruction (fewer than two readable
    images, no matches), an output folder of another descriptor or program, or (under
    torchrun) a rank that failed or was lost; 2: a bad option or path, reported before
    anything is computed or written; 3: the mapper made no model. Under torchrun every rank
    runs this; only rank 0 prints, and the other ranks return 0 once their matching is done.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    main_rank = rank_from_env() == 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import pycolmap

    pycolmap.logging.minloglevel = 0 if args.verbose else 2
    try:
        settings = _settings(args)
        check_number("dist_timeout", args.dist_timeout, low=0, low_open=True)
        dist = init_distributed(settings.device, args.dist_timeout)
        summaries = run_sfm(args.image_dir, args.out_dir, expand_compare(args.descriptor, args.compare), settings, dist)
    except OptionError as err:  # run_sfm checks every option and path before any work
        return report(err, parser) if main_rank else EXIT_BAD_OPTION
    except (OutputConflictError, SfmError, DistributedError) as err:
        if main_rank:
            hint = f" ({flag_names(parser)['overwrite']})" if isinstance(err, OutputConflictError) else ""
            print("error:", " ".join(str(err).split()) + hint, file=sys.stderr)  # one line, even with HDF5's messages
        return 1
    finally:  # after the error line: the other ranks may be ending already
        close_distributed()
    if not main_rank:
        return 0
    _print_summary(summaries, parser)
    return 0 if any(s["num_models"] for s in summaries.values()) else 3


if __name__ == "__main__":
    # Under torchrun, a failing rank's traceback then appears in the job's error summary
    # (not on main itself: its fault handler needs a real stderr, which tests capture).
    sys.exit(record(main)())
