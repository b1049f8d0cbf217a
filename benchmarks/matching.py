"""Descriptor matching benchmark on image sequences with ground-truth homographies.

Usage::

    python -m benchmarks.matching                      # synthetic sequences from skimage photos
    python -m benchmarks.matching --data ../shared/data/oxford --out runs/oxford
    python -m benchmarks.matching --download oxford    # the eight Oxford sequences
    python -m benchmarks.matching --validation ../shared/data/train  # held-out validation sequences
    python -m benchmarks.matching --list               # descriptor names

Every descriptor describes the same keypoints (OpenCV SIFT detections, or MSER ellipses),
so the comparison isolates the descriptor. docs/benchmark.md defines the
protocol and the metrics.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from exemplar_desc.atomic import atomic_write
from exemplar_desc.registry import check_descriptor_name, is_exemplar
from exemplar_desc.cli import ArgumentParser, add_shared_options, report
from exemplar_desc.checks import OptionError, check, check_device, check_number, check_output_dir, check_output_file

from .datasets import KINDS, ImageSequence, default_cache_dir, load_sequences
from .descriptors import as_float, build_descriptors, catalogue
from .metrics import HOMOGRAPHY_FIT, HOMOGRAPHY_KEYS, HOMOGRAPHY_THRESHOLDS, MMA_THRESHOLDS, evaluate_pair
from .validation import HELD_OUT_FOLDERS, ensure_validation_dataset, held_out_photos

logger = logging.getLogger(__name__)

__all__ = ["detect", "run_benchmark", "summarise", "format_table", "write_outputs", "main"]

DETECTORS = ("sift", "mser")
# Plots: file stem -> (axis label, metric of one pair).
_PLOT_METRICS = {
    "mAP": ("mAP", lambda m: m["mAP"]),
    "matching_score": ("matching score", lambda m: m["matching_score"]),
    "MMA_3px": ("MMA@3px", lambda m: m["MMA"][MMA_THRESHOLDS.index(3)]),
    "homography_3px": ("homography accuracy @3px", lambda m: m["H@3px"]),
    "homography_mean": ("homography accuracy, mean over 1/3/5/10 px", lambda m: m["H_mean"]),
}
OUTPUT_FILES = ("results.json", "results.csv", *[f"{stem}.png" for stem in _PLOT_METRICS], "mma_curves.png")


def _mser_regions(gray: np.ndarray, max_regions: int) -> tuple[list[cv2.KeyPoint], np.ndarray]:
    """MSER regions as ellipses with the regions' second moments, and keypoints on them.

    A uniform ellipse with semi-axes a, b has covariance with eigenvalues a^2/4, b^2/4, so
    the ellipse is ``dx^T (4 C)^-1 dx <= 1`` for the region's pixel covariance C. The
    keypoint has the centre, ``size`` = sqrt(a b) (the equal-area radius, so SIFT's window
    of about 6 x size spans three region diameters) and ``angle`` along the major axis.
    """
    regions, _ = cv2.MSER_create().detectRegions(gray)
    kps, ellipses = [], []
    for points in regions[:max_regions]:
        pts = points.astype(np.float64)
        centre, cov = pts.mean(axis=0), np.cov(pts.T) + np.eye(2) / 12.0  # + pixel extent
        evals, evecs = np.linalg.eigh(cov)
        A = np.linalg.inv(4.0 * cov)
        angle = float(np.degrees(np.arctan2(evecs[1, 1], evecs[0, 1])) % 360.0)
        kps.append(cv2.KeyPoint(float(centre[0]), float(centre[1]), float(2.0 * np.sqrt(np.sqrt(evals.prod()))), angle))
        ellipses.append([centre[0], centre[1], A[0, 0], A[0, 1], A[1, 1]])
    return kps, np.array(ellipses, dtype=np.float64).reshape(-1, 5)


def detect(image: np.ndarray, detector: str = "sift", num_features: int = 2000) -> tuple[list[cv2.KeyPoint], np.ndarray | None]:
    """Keypoints shared by all descriptors.

    Args:
        image: uint8 grey (H, W) image.
        detector: ``"sift"`` (``cv2.SIFT_create(nfeatures=num_features)``) or ``"mser"``.
        num_features: the most keypoints to keep (>= 1).

    Returns:
        Keypoints with ``class_id`` set to their index, and for MSER the (N, 5) ellipses
        ``(x, y, a, b, c)`` (None for SIFT).

    Raises:
        OptionError (a ValueError): an unknown detector, ``num_features`` < 1 (OpenCV would
            read 0 as no limit).
    """
    check_number("num_features", num_features, low=1, integer=True)
    if detector == "sift":
        kps, ellipses = list(cv2.SIFT_create(nfeatures=num_features).detect(image, None)), None
    elif detector == "mser":
        kps, ellipses = _mser_regions(image, num_features)
    else:
        raise OptionError("detector", detector, f"must be one of {', '.join(DETECTORS)}")
    for i, kp in enumerate(kps):
        kp.class_id = i  # survives compute(), which may drop or reorder keypoints
    return kps, ellipses


def _source_indices(kps_in: list[cv2.KeyPoint], kps_out: list[cv2.KeyPoint]) -> np.ndarray:
    """(N_out,) index of the detected keypoint each returned one stands for: its ``class_id``
    as set by :func:`detect`, or the nearest detection when a descriptor did not keep it."""
    ids = np.array([kp.class_id for kp in kps_out], dtype=int)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(kps_in)):
        xy_in = np.array([kp.pt for kp in kps_in], dtype=np.float64)
        xy_out = np.array([kp.pt for kp in kps_out], dtype=np.float64)
        ids = np.linalg.norm(xy_out[:, None] - xy_in[None], axis=2).argmin(axis=1)
    return ids


def _nanmean(values: list[float]) -> float:
    values = np.array(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _aggregate(pairs: list[dict]) -> dict:
    """Mean of per-pair metrics (mAP and the inlier error ignore pairs where they are undefined)."""
    if not pairs:
        return {"num_pairs": 0}
    out = {
        "mAP": _nanmean([p["mAP"] for p in pairs]),
        "matching_score": float(np.mean([p["matching_score"] for p in pairs])),
        "MMA": np.mean([p["MMA"] for p in pairs], axis=0).tolist(),
        "homography_error_median": float(np.median([p["homography_error"] for p in pairs])),
        **{k: float(np.mean([p[k] for p in pairs])) for k in HOMOGRAPHY_KEYS},
        "num_correct_matches": float(np.mean([p["num_correct_matches"] for p in pairs])),
        "inlier_error": _nanmean([p["inlier_error"] for p in pairs]),
        "num_pairs": len(pairs),
    }
    return out


def _check_protocol(detector: str, num_features: int, pixel_threshold: float, ratio: float | None) -> None:
    """Check the keypoints and the correct-match criterion of a run (see :func:`run_benchmark`)."""
    check(detector in DETECTORS, "detector", detector, f"must be one of {', '.join(DETECTORS)}")
    check_number("num_features", num_features, low=1, integer=True)
    check_number("pixel_threshold", pixel_threshold, low=0, low_open=True)
    if ratio is not None:
        check_number("ratio", ratio, low=0, low_open=True, high=1)


def _evaluate_sequence(seq: ImageSequence, described: list, pixel_threshold: float, ratio: float | None) -> dict:
    """Metrics of the pairs 1-k of one sequence from each image's (xy, descriptors, MSER regions or None)."""
    xy1, d1, e1 = described[0]
    pairs = {}
    for k in range(1, len(seq.images)):
        xyk, dk, ek = described[k]
        pairs[seq.pairs[k - 1]] = evaluate_pair(
            xy1, xyk, d1, dk, seq.homographies[k], seq.images[0].shape, seq.images[k].shape,
            pixel_threshold=pixel_threshold, ellipses1=e1, ellipses2=ek, ratio=ratio,
        )
    return {"kind": seq.kind, "pairs": pairs}


def _run_descriptor(name: str, descriptor, sequences: list[ImageSequence], detections: dict, pixel_threshold: float,
                    ratio: float | None, errors: dict, bar) -> dict:
    """One descriptor on every sequence: ``{"time_per_keypoint_ms", "magnification", "sequences"}``; a failing
    sequence is logged and recorded in ``errors`` under ``name/sequence``."""
    seconds, count, per_seq = 0.0, 0, {}
    norm = descriptor.defaultNorm() if hasattr(descriptor, "defaultNorm") else cv2.NORM_L2
    try:  # untimed warm-up, so one-off start-up costs (lazy init, allocation) are not timed
        descriptor.compute(sequences[0].images[0], detections[sequences[0].name][0][0])
    except Exception:  # noqa: BLE001 - the same call fails again below, where it is reported per sequence
        logger.debug("warm-up of %s failed", name, exc_info=True)
    for seq in sequences:
        bar.set_postfix_str(f"{name} / {seq.name}")
        try:
            described = []
            for image, (kps, ellipses) in zip(seq.images, detections[seq.name]):
                start = time.perf_counter()
                kps_out, desc = descriptor.compute(image, kps)
                seconds += time.perf_counter() - start  # also counted when a later image fails
                count += len(kps_out)
                xy = np.array([kp.pt for kp in kps_out], dtype=np.float64).reshape(-1, 2)
                regions = None if ellipses is None else ellipses[_source_indices(kps, kps_out)]
                described.append((xy, as_float(desc, norm, len(kps_out)), regions))
            per_seq[seq.name] = _evaluate_sequence(seq, described, pixel_threshold, ratio)
        except Exception as err:  # one failing descriptor/sequence must not stop the run
            logger.exception("%s on %s failed", name, seq.name)
            errors[f"{name}/{seq.name}"] = f"{type(err).__name__}: {err}"
        bar.update(1)
    return {"time_per_keypoint_ms": 1000.0 * seconds / count if count else float("nan"),
            "magnification": getattr(descriptor, "magnification", None), "sequences": per_seq}


def run_benchmark(
    sequences: list[ImageSequence],
    descriptors: dict[str, object],
    detector: str = "sift",
    num_features: int = 2000,
    pixel_threshold: float = 3.0,
    progress: bool = True,
    ratio: float | None = None,
) -> dict:
    """Describe the shared keypoints of every image with every descriptor and evaluate all pairs 1-k.

    Each descriptor first describes one image untimed (warm-up); its time per keypoint is
    the wall time of all further ``compute`` calls over the keypoints they returned.

    Args:
        sequences: at least one sequence.
        descriptors: name -> object with OpenCV's ``compute``; at least one.
        detector: one of :data:`DETECTORS`.
        num_features: the most keypoints per image (>= 1).
        pixel_threshold: symmetric reprojection error in pixels (> 0) of a correct match.
        progress: show a progress bar on stderr.
        ratio: Lowe ratio in (0, 1] on the mutual matches of MMA, homography and the
            correct-match statistics (None: off); see :func:`benchmarks.metrics.evaluate_pair`.

    Returns:
        ``{"descriptors": {name: {"time_per_keypoint_ms", "magnification" (patch side /
        ``KeyPoint.size``, None for a descriptor without one), "sequences": {seq: {"kind",
        "pairs": {"1-k": metrics}}}}}, "errors": {...}}``; :func:`summarise` adds the summaries.

    Raises:
        OptionError (a ValueError): a bad argument, named as above; checked before any work.
    """
    from tqdm import tqdm

    check(len(sequences) > 0, "sequences", sequences, "no sequence to run on")
    check(len(descriptors) > 0, "descriptors", descriptors, "no descriptor to run")
    _check_protocol(detector, num_features, pixel_threshold, ratio)

    detections = {s.name: [detect(img, detector, num_features) for img in s.images] for s in sequences}
    results: dict = {"descriptors": {}, "errors": {}}
    bar = tqdm(total=len(descriptors) * len(sequences), desc="matching", unit="seq", disable=not progress, file=sys.stderr)
    for name, descriptor in descriptors.items():
        results["descriptors"][name] = _run_descriptor(name, descriptor, sequences, detections, pixel_threshold, ratio,
                                                       results["errors"], bar)
    bar.close()
    return results


def summarise(results: dict) -> dict:
    """Add per-sequence, per-kind and overall means to :func:`run_benchmark`'s results (in place)."""
    for entry in results["descriptors"].values():
        by_kind: dict[str, list] = {}
        every = []
        for seq in entry["sequences"].values():
            pairs = list(seq["pairs"].values())
            seq["summary"] = _aggregate(pairs)
            by_kind.setdefault(seq["kind"], []).extend(pairs)
            every.extend(pairs)
        entry["per_kind"] = {k: _aggregate(by_kind[k]) for k in KINDS if k in by_kind}
        entry["summary"] = _aggregate(every)
    return results


def _fmt(value: float, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def format_table(results: dict) -> str:
    """Console table: mAP per kind and overall, matching score, MMA@3px, homography accuracy at each
    threshold and their mean ("H mean") (%), correct matches per pair and their mean error (px), ms per keypoint."""
    kinds = [k for k in KINDS if any(k in e.get("per_kind", {}) for e in results["descriptors"].values())]
    header = ["descriptor", *[f"mAP {k}" for k in kinds], "mAP", "MS", "MMA@3",
              *[k.replace("_", " ") for k in HOMOGRAPHY_KEYS], "correct", "err px", "ms/kp"]
    rows = [header]
    for name, entry in results["descriptors"].items():
        s = entry.get("summary", {})
        mma3 = s["MMA"][MMA_THRESHOLDS.index(3)] if "MMA" in s else float("nan")
        rows.append([
            name,
            *[_fmt(entry["per_kind"].get(k, {}).get("mAP", float("nan"))) for k in kinds],
            _fmt(s.get("mAP", float("nan"))), _fmt(s.get("matching_score", float("nan"))), _fmt(mma3),
            *[_fmt(s.get(k, float("nan"))) for k in HOMOGRAPHY_KEYS],
            f"{s['num_correct_matches']:.0f}" if "num_correct_matches" in s else "-",
            _fmt(s.get("inlier_error", float("nan")), percent=False),
            _fmt(entry["time_per_keypoint_ms"], percent=False),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _csv_rows(results: dict) -> list[list]:
    header = ["descriptor", "scope", "kind", "sequence", "pair", "mAP", "matching_score",
              *[f"MMA@{t}px" for t in MMA_THRESHOLDS], *HOMOGRAPHY_KEYS, "homography_error", "num_correct_matches",
              "inlier_error", "time_per_keypoint_ms"]
    rows = [header]

    def row(name, scope, kind, seq, pair, m, err_key, ms):
        rows.append([name, scope, kind, seq, pair, m.get("mAP"), m.get("matching_score"), *m.get("MMA", [None] * 10),
                     *[m.get(k) for k in HOMOGRAPHY_KEYS], m.get(err_key), m.get("num_correct_matches"),
                     m.get("inlier_error"), ms])

    for name, e in results["descriptors"].items():
        ms = e["time_per_keypoint_ms"]
        for seq_name, seq in e["sequences"].items():
            for pair, m in seq["pairs"].items():
                row(name, "pair", seq["kind"], seq_name, pair, m, "homography_error", ms)
            row(name, "sequence", seq["kind"], seq_name, "", seq["summary"], "homography_error_median", ms)
        for kind, m in e["per_kind"].items():
            row(name, "kind", kind, "", "", m, "homography_error_median", ms)
        row(name, "overall", "", "", "", e["summary"], "homography_error_median", ms)
    return [[("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for v in r] for r in _json_safe(rows)]


def _plots(results: dict) -> dict[str, bytes]:
    """PNG figures: each metric against pair index per sequence, and MMA against threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["descriptors"])
    seqs = sorted({s for e in results["descriptors"].values() for s in e["sequences"]})
    figures = {}
    cols = min(4, max(1, len(seqs)))
    nrows = max(1, math.ceil(len(seqs) / cols))
    for stem, (label, get) in _PLOT_METRICS.items():
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        for ax, seq in zip(axes.flat, seqs):
            for name in names:
                entry = results["descriptors"][name]["sequences"].get(seq)
                if entry:
                    pairs = list(entry["pairs"])
                    ax.plot([int(p.split("-")[1]) for p in pairs], [get(entry["pairs"][p]) for p in pairs], "o-", label=name)
            ax.set_title(f"{seq} ({results['descriptors'][names[0]]['sequences'].get(seq, {}).get('kind', '')})")
            ax.set_xlabel("image k of pair 1-k")
            ax.set_ylabel(label)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(seqs):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        figures[f"{stem}.png"] = fig
    kinds = ["overall", *[k for k in KINDS if any(k in e["per_kind"] for e in results["descriptors"].values())]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        for name, e in results["descriptors"].items():
            m = e["summary"] if kind == "overall" else e["per_kind"].get(kind)
            if m and "MMA" in m:
                ax.plot(MMA_THRESHOLDS, m["MMA"], "o-", ms=3, label=name)
        ax.set_title(kind)
        ax.set_xlabel("threshold (px)")
        ax.set_ylabel("MMA")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figures["mma_curves.png"] = fig
    out = {}
    for name, fig in figures.items():
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def write_outputs(results: dict, out_dir: str | Path) -> list[Path]:
    """Write results.json, results.csv and PNG plots into ``out_dir``, each file atomically.

    Returns:
        The written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"results.json": json.dumps(_json_safe(results), indent=1).encode()}
    text = io.StringIO()
    csv.writer(text).writerows(_csv_rows(results))
    files["results.csv"] = text.getvalue().encode()
    if results["descriptors"] and any(e["sequences"] for e in results["descriptors"].values()):
        files.update(_plots(results))
    for name, data in files.items():
        atomic_write(out_dir / name, lambda tmp: Path(tmp).write_bytes(data))
    return [out_dir / name for name in files]


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.matching", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder of sequences (Oxford or HPatches layout), or one sequence folder; "
                   "default: synthetic sequences generated from scikit-image photos")
    p.add_argument("--download", choices=["oxford"], help="download the eight Oxford sequences into the cache and run on them")
    p.add_argument("--validation", type=Path, metavar="TRAIN_ROOT",
                   help=f"run on the held-out validation sequences, generated into the cache from the "
                        f"{' and '.join(HELD_OUT_FOLDERS)} folders of this training-photo root (see docs/benchmark.md)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default $EXEMPLAR_DESC_CACHE or ~/.cache/exemplar_desc)")
    p.add_argument("--descriptors", help="comma-separated names (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="list descriptor names and exit")
    p.add_argument("--detector", choices=DETECTORS, default="sift", help="shared keypoints (default sift)")
    p.add_argument("--num-features", type=int, default=2000, help="keypoints per image, >= 1 (default 2000)")
    p.add_argument("--threshold", dest="pixel_threshold", metavar="THRESHOLD", type=float, default=3.0,
                   help="symmetric reprojection error (px, > 0) for a correct match in mAP and matching score (default 3)")
    p.add_argument("--ratio", type=float, default=None,
                   help="Lowe ratio in (0, 1] on the mutual matches of MMA, homography and correct-match statistics (default: off)")
    add_shared_options(p, "--device", "--precision", "--magnification", magnification={
        "help": "patch side / KeyPoint.size (> 0) for the Exemplar models and the kornia patch descriptors "
                "(default: each model card's, each peer's own)"})
    p.add_argument("--min-patch-side", type=float, metavar="PIXELS",
                   help="smallest patch side in pixels (>= 0) for the Exemplar models (default: each model card's, else 0)")
    p.add_argument("--out", type=Path, help="write results.json, results.csv and PNG plots here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _check_descriptor_names(text: str | None) -> list[str] | None:
    """``--descriptors`` as a list of names (None: all); OptionError for an empty list, an
    unknown name or an ``exemplar:<model>`` whose card does not exist."""
    if text is None:
        return None
    known, _ = catalogue()
    available = f"available: {', '.join(known)} or exemplar:<model or card path>"
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    check(len(names) > 0, "descriptors", text, f"name at least one descriptor; {available}")
    for name in names:
        if name.startswith("exemplar:"):
            check_descriptor_name("descriptors", name)
        else:
            check(name in known or name == "exemplar", "descriptors", text, f"unknown descriptor {name!r}; {available}")
    return names


def _check_args(args) -> tuple[list[str] | None, Path]:
    """Check every option and path before any work.

    Returns:
        The descriptor names (None: all) and the cache folder.

    Raises:
        OptionError: naming the destination of the first bad option, its value and what is allowed.
    """
    _check_protocol(args.detector, args.num_features, args.pixel_threshold, args.ratio)
    if args.magnification is not None:
        check_number("magnification", args.magnification, low=0, low_open=True)
    if args.min_patch_side is not None:
        check_number("min_patch_side", args.min_patch_side, low=0)
    check_device("device", args.device)
    names = _check_descriptor_names(args.descriptors)
    cache = args.cache or default_cache_dir()
    if args.validation is not None:
        for option, value in (("--data", args.data), ("--download", args.download)):
            check(value is None, "validation", str(args.validation), f"cannot be combined with {option}")
        try:
            held_out_photos(args.validation)
        except (FileNotFoundError, ValueError) as err:
            raise OptionError("validation", str(args.validation), str(err)) from None
    if args.data is not None:
        check(args.download is None, "download", args.download, "cannot be combined with --data")
        check(args.data.is_dir(), "data", str(args.data),
              "exists but is not a folder" if args.data.exists() else "no such folder")
    else:  # the downloaded or generated sequences are written there
        check_output_dir("cache", cache)
    if args.out is not None:
        for name in OUTPUT_FILES:
            check_output_file("out", check_output_dir("out", args.out) / name)
    return names, cache


def _data_folder(args: argparse.Namespace, cache: Path) -> Path:
    """The sequence folder the options name: Oxford downloaded into ``cache``, ``--data``, the validation
    sequences generated from ``--validation``'s photos, or the embedded synthetic sequences."""
    if args.download:
        from .download import download_oxford

        data, failed = download_oxford(cache / "oxford")
        for name, err in failed.items():
            print(f"download of {name} failed: {err}", file=sys.stderr)
        return data
    if args.data:
        return args.data
    if args.validation:
        return ensure_validation_dataset(args.validation, cache)
    from .synthetic import ensure_synthetic_dataset

    return ensure_synthetic_dataset(cache)


def _protocol(args: argparse.Namespace, data: Path, descriptors: dict) -> dict:
    """The results' ``protocol`` record: the data, keypoints, descriptor settings and match criteria of this run."""
    return {"data": str(data), "validation_photos": None if args.validation is None else str(args.validation),
            "detector": args.detector, "num_features": args.num_features,
            "magnification": args.magnification, "min_patch_side": args.min_patch_side,
            "exemplar_precision": {n: d.precision for n, d in descriptors.items() if is_exemplar(n)},
            "pixel_threshold": args.pixel_threshold, "overlap_threshold": 0.5, "ratio": args.ratio,
            "mma_thresholds": list(MMA_THRESHOLDS), "homography_thresholds": list(HOMOGRAPHY_THRESHOLDS),
            "homography_fit": HOMOGRAPHY_FIT}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status: 0 ok, 1 nothing to run (no usable
    sequence, no descriptor could be built), 2 a bad option or path (reported before any work)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        names, unavailable = catalogue()
        for name in names:
            print(f"{name:24s} {'unavailable: ' + unavailable[name] if name in unavailable else ''}".rstrip())
        return 0
    try:
        names, cache = _check_args(args)
    except OptionError as err:
        return report(err, parser)
    descriptors, skipped = build_descriptors(names, device=args.device, magnification=args.magnification,
                                             precision=args.precision, min_patch_side=args.min_patch_side)
    if not descriptors:
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}", file=sys.stderr)
        print("error: no descriptor could be built", file=sys.stderr)
        return 1
    data = _data_folder(args, cache)
    sequences, bad = load_sequences(data)
    for name, err in bad.items():
        print(f"skipped sequence {name}: {err}", file=sys.stderr)
    if not sequences:
        print(f"error: no usable sequence in {data}", file=sys.stderr)
        return 1
    print(f"data: {data} ({len(sequences)} sequences: {', '.join(s.name for s in sequences)})")
    criterion = "ellipse overlap >= 0.5" if args.detector == "mser" else \
        f"symmetric reprojection error <= {args.pixel_threshold:g} px"
    print(f"keypoints: {args.detector}, up to {args.num_features} per image; correct match: {criterion}")
    results = run_benchmark(sequences, descriptors, args.detector, args.num_features, args.pixel_threshold,
                            not args.no_progress, args.ratio)
    results = {
        "protocol": _protocol(args, data, descriptors),
        "skipped_descriptors": skipped,
        "failed_sequences": bad,
        **summarise(results),
    }
    print(format_table(results))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for key, err in results["errors"].items():
        print(f"failed {key}: {err}", file=sys.stderr)
    if args.out:
        for path in write_outputs(results, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
