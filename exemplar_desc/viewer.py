"""Match viewer: match two images with one or more descriptors and draw the RANSAC inliers.

    python -m exemplar_desc.viewer IMG1 IMG2 [--descriptor NAME] [--compare NAME ...]
        [--geometry homography|fundamental] [--threshold PX] [--out matches.png]

Keypoints are OpenCV SIFT (DoG) keypoints, detected once per image; every descriptor
describes the same keypoints. Matches are mutual nearest neighbours
(:func:`exemplar_desc.matching.match_descriptors`), verified by OpenCV's RANSAC with a
homography or a fundamental matrix. The command prints one table row per descriptor and
writes a PNG with one panel per descriptor: the two images side by side, inliers drawn
as lines. Exit status: 0 on success, 1 when a descriptor finds too few matches for the
geometry, 2 for a bad option or input file.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .atomic import atomic_write
from .registry import check_descriptor_name, create_descriptor
from .cli import ArgumentParser, add_shared_options, report
from .checks import OptionError, check, check_device, check_number, check_output_file
from .images import UnreadableImageError, decode_gray, read_image_bytes, resize_to_max
from .matching import mutual_nearest_neighbours

__all__ = ["MIN_MATCHES", "TITLE_HEIGHT", "TooFewMatchesError", "PairResult", "detect_keypoints", "match_pair",
           "fit_geometry", "draw_panel", "panel_title", "format_table", "write_png", "main"]

#: Matches a geometry needs: 4 point pairs fix a homography, 8 a fundamental matrix (OpenCV's RANSAC minimum).
MIN_MATCHES = {"homography": 4, "fundamental": 8}
#: Height in pixels of the title bar above each panel of the PNG, for panels up to 1600 pixels wide;
#: wider panels scale it, the text and the lines with their width (see :func:`draw_panel`).
TITLE_HEIGHT = 28
_BASE_WIDTH = 1600

_INLIER = (60, 220, 60)  # BGR
_OUTLIER = (40, 40, 230)


class TooFewMatchesError(RuntimeError):
    """A descriptor found fewer matches than the geometry needs."""


@dataclass
class PairResult:
    """One descriptor's matches between two images.

    Attributes:
        name: descriptor name.
        matches: (M, 2) int indices (keypoint of image 1, keypoint of image 2), mutual nearest neighbours.
        inliers: (M,) bool, RANSAC inliers of the geometry.
        model: (3, 3) float64 homography or fundamental matrix (image 1 -> image 2), None if RANSAC found none.
        seconds: time to describe both images, match and run RANSAC.
    """

    name: str
    matches: np.ndarray
    inliers: np.ndarray
    model: np.ndarray | None
    seconds: float

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())

    @property
    def inlier_ratio(self) -> float:
        return self.num_inliers / len(self.matches) if len(self.matches) else 0.0


def detect_keypoints(gray: np.ndarray, max_keypoints: int) -> list[cv2.KeyPoint]:
    """OpenCV SIFT (DoG) keypoints, the strongest ``max_keypoints`` of them.

    Args:
        gray: (H, W) uint8 image.
        max_keypoints: at most this many (SIFT keeps a few more where responses tie).

    Returns:
        cv2.KeyPoints in pixels (x right, y down), ``size`` a diameter, ``angle`` in degrees.
    """
    return list(cv2.SIFT_create(nfeatures=max_keypoints).detect(gray, None))


def _describe(descriptor, gray: np.ndarray, keypoints: list[cv2.KeyPoint], name: str) -> np.ndarray:
    kps, desc = descriptor.compute(gray, keypoints)
    if desc is None:
        return np.zeros((0, 128), dtype=np.float32)
    # Matches index the shared keypoint list, so a descriptor must keep every keypoint in order.
    if len(kps) != len(keypoints):
        raise RuntimeError(f"descriptor {name} returned {len(kps)} of {len(keypoints)} keypoints")
    return desc.astype(np.float32)


def fit_geometry(
    pts1: np.ndarray, pts2: np.ndarray, geometry: str, threshold: float, seed: int = 0
) -> tuple[np.ndarray | None, np.ndarray]:
    """RANSAC fit of a homography or fundamental matrix with OpenCV, seeded for repeatable results.

    Args:
        pts1, pts2: (M, 2) float pixel coordinates (x, y) of matched points in images 1 and 2.
        geometry: ``"homography"`` (reprojection error in image 2) or ``"fundamental"``
            (distance to the epipolar line).
        threshold: inlier threshold in pixels.
        seed: seed of OpenCV's random number generator (``cv2.setRNGSeed``).

    Returns:
        (3, 3) float64 model or None (degenerate data), and (M,) bool inlier mask.

    Raises:
        TooFewMatchesError: fewer than ``MIN_MATCHES[geometry]`` matches.
    """
    if geometry not in MIN_MATCHES:
        raise ValueError(f"geometry must be one of {', '.join(MIN_MATCHES)}, got {geometry!r}")
    if len(pts1) < MIN_MATCHES[geometry]:
        raise TooFewMatchesError(f"{len(pts1)} matches; a {geometry} needs at least {MIN_MATCHES[geometry]}")
    pts1, pts2 = np.float32(pts1), np.float32(pts2)
    cv2.setRNGSeed(seed)
    if geometry == "homography":
        model, mask = cv2.findHomography(pts1, pts2, cv2.RANSAC, threshold, maxIters=10000, confidence=0.999)
    else:
        model, mask = cv2.findFundamentalMat(pts1, pts2, cv2.FM_RANSAC, threshold, 0.999, 10000)
        if model is not None and model.shape != (3, 3):  # several solutions stacked: none is well defined
            model, mask = None, None
    if model is None or mask is None:
        return None, np.zeros(len(pts1), dtype=bool)
    return model.astype(np.float64), mask.ravel().astype(bool)


def match_pair(
    name: str,
    descriptor,
    gray1: np.ndarray,
    gray2: np.ndarray,
    kps1: list[cv2.KeyPoint],
    kps2: list[cv2.KeyPoint],
    geometry: str,
    threshold: float,
    seed: int = 0,
) -> PairResult:
    """Describe both images' keypoints, match mutual nearest neighbours and verify with RANSAC.

    Args:
        name: descriptor name, for the result and messages.
        descriptor: object with a Feature2D ``compute`` (see :func:`exemplar_desc.create_descriptor`).
        gray1, gray2: (H, W) uint8 images; kps1, kps2: their keypoints.
        geometry, threshold, seed: see :func:`fit_geometry`.

    Raises:
        TooFewMatchesError: fewer mutual matches than the geometry needs (the message names the descriptor).
    """
    start = time.perf_counter()
    desc1 = _describe(descriptor, gray1, kps1, name)
    desc2 = _describe(descriptor, gray2, kps2, name)
    matches, _ = mutual_nearest_neighbours(desc1, desc2)
    pts1 = np.array([kps1[i].pt for i in matches[:, 0]], dtype=np.float32).reshape(-1, 2)
    pts2 = np.array([kps2[j].pt for j in matches[:, 1]], dtype=np.float32).reshape(-1, 2)
    try:
        model, inliers = fit_geometry(pts1, pts2, geometry, threshold, seed)
    except TooFewMatchesError as err:
        raise TooFewMatchesError(f"{name}: {err}") from None
    return PairResult(name, matches, inliers, model, time.perf_counter() - start)


def _side_by_side(gray1: np.ndarray, gray2: np.ndarray) -> np.ndarray:
    height = max(gray1.shape[0], gray2.shape[0])
    canvas = np.zeros((height, gray1.shape[1] + gray2.shape[1], 3), dtype=np.uint8)
    canvas[: gray1.shape[0], : gray1.shape[1]] = gray1[:, :, None]
    canvas[: gray2.shape[0], gray1.shape[1] :] = gray2[:, :, None]
    return canvas


def draw_panel(
    gray1: np.ndarray,
    gray2: np.ndarray,
    kps1: list[cv2.KeyPoint],
    kps2: list[cv2.KeyPoint],
    result: PairResult,
    title: str,
    show_outliers: bool = False,
) -> np.ndarray:
    """One panel: a title bar over both images side by side, inlier matches as green lines.

    Args:
        gray1, gray2: (H1, W1) and (H2, W2) uint8 images.
        kps1, kps2: their keypoints, indexed by ``result.matches``.
        result: the descriptor's matches and inliers.
        title: text of the title bar.
        show_outliers: also draw the rejected matches, faint red, under the inliers.

    Returns:
        (T + max(H1, H2), W1 + W2, 3) uint8 BGR image, T = ``TITLE_HEIGHT`` times
        ``max(1, (W1 + W2) / 1600)``, rounded.
    """
    canvas = _side_by_side(gray1, gray2)
    zoom = max(1.0, canvas.shape[1] / _BASE_WIDTH)  # keeps text and lines legible on wide panels
    thickness = max(1, round(zoom))
    canvas = (0.6 * canvas).astype(np.uint8)  # dim the photos so the lines stand out
    offset = np.array([gray1.shape[1], 0], dtype=np.float64)
    shift = 4  # sub-pixel line ends: coordinates in 1/16 pixel

    def line(image: np.ndarray, i: int, j: int, color: tuple[int, int, int]) -> None:
        p = np.round(np.array(kps1[i].pt) * (1 << shift)).astype(int)
        q = np.round((np.array(kps2[j].pt) + offset) * (1 << shift)).astype(int)
        cv2.line(image, tuple(map(int, p)), tuple(map(int, q)), color, thickness, cv2.LINE_AA, shift)

    if show_outliers:
        faint = canvas.copy()
        for i, j in result.matches[~result.inliers]:
            line(faint, i, j, _OUTLIER)
        canvas = cv2.addWeighted(canvas, 0.6, faint, 0.4, 0)
    for i, j in result.matches[result.inliers]:
        line(canvas, i, j, _INLIER)
        cv2.circle(canvas, tuple(map(int, np.round(np.array(kps1[i].pt)))), 2 * thickness, _INLIER, -1, cv2.LINE_AA)
        cv2.circle(canvas, tuple(map(int, np.round(np.array(kps2[j].pt) + offset))), 2 * thickness, _INLIER, -1, cv2.LINE_AA)
    height = round(TITLE_HEIGHT * zoom)
    bar = np.full((height, canvas.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(bar, title, (round(6 * zoom), round(height - 9 * zoom)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * zoom, (0, 0, 0),
                thickness, cv2.LINE_AA)
    return np.vstack([bar, canvas])


def panel_title(result: PairResult, num_kps: tuple[int, int], geometry: str, threshold: float) -> str:
    """Title line of a panel: descriptor, keypoints, matches, inliers and the RANSAC settings."""
    return (
        f"{result.name}: {num_kps[0]}/{num_kps[1]} keypoints, {len(result.matches)} mutual matches, "
        f"{result.num_inliers} inliers ({100 * result.inlier_ratio:.1f}%), {geometry} RANSAC {threshold:g} px"
    )


def format_table(results: Sequence[PairResult], num_kps: tuple[int, int]) -> str:
    """The printed table: one row per descriptor (keypoints img1/img2, matches, inliers, ratio, seconds)."""
    width = max([len("descriptor")] + [len(r.name) for r in results])
    kps = f"{num_kps[0]}/{num_kps[1]}"
    lines = [f"{'descriptor':<{width}}  {'keypoints':>11}  {'matches':>7}  {'inliers':>7}  {'ratio':>6}  {'seconds':>7}"]
    for r in results:
        lines.append(
            f"{r.name:<{width}}  {kps:>11}  {len(r.matches):>7}  {r.num_inliers:>7}  {r.inlier_ratio:>6.3f}  {r.seconds:>7.2f}"
        )
    return "\n".join(lines)


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode ``image`` ((H, W, 3) uint8 BGR) as PNG and write it atomically."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as PNG")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data.tobytes()))


def _read_gray(option: str, path: str) -> np.ndarray:
    check(Path(path).is_file(), option, path, "no such file")
    try:
        return decode_gray(read_image_bytes(path)[0], name=path)
    except UnreadableImageError as err:
        raise OptionError(option, path, str(err).removeprefix(f"{path}: ")) from None
    except OSError as err:
        raise OptionError(option, path, f"cannot be read ({err.strerror})") from None


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m exemplar_desc.viewer", description=__doc__.split("\n\n")[0])
    p.add_argument("image1", metavar="IMG1", help="first image")
    p.add_argument("image2", metavar="IMG2", help="second image")
    p.add_argument("--descriptor", default="exemplar", metavar="NAME",
                   help="exemplar, exemplar:<model>, sift or rootsift (default: %(default)s)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME",
                   help="also match with NAME on the same keypoints (repeatable), e.g. --compare sift")
    p.add_argument("--geometry", choices=tuple(MIN_MATCHES), default="homography",
                   help="model RANSAC fits: homography (planar scene or rotating camera) or fundamental (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=3.0, metavar="PX",
                   help="RANSAC inlier threshold in pixels (default: %(default)s)")
    add_shared_options(p, "--max-keypoints", max_keypoints={"default": 4000})
    p.add_argument("--max-size", type=int, default=1600, metavar="PX",
                   help="downscale so the longer side is at most PX pixels, 0 to keep the size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="RANSAC seed (cv2.setRNGSeed) (default: %(default)s)")
    add_shared_options(p, "--device")
    p.add_argument("--show-outliers", action="store_true", help="also draw the matches RANSAC rejects, faint red")
    p.add_argument("--out", default="matches.png", metavar="PNG", help="picture to write (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the match viewer; returns the exit status (0 done, 1 too few matches, 2 bad option or input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = list(dict.fromkeys([args.descriptor, *args.compare]))  # in order, without repeats
    try:
        check_number("threshold", args.threshold, low=0, low_open=True)
        check_number("max_keypoints", args.max_keypoints, low=1, integer=True)
        check_number("max_size", args.max_size, low=0, integer=True)
        check(args.max_size == 0 or args.max_size >= 32, "max_size", args.max_size, "must be 0 (keep) or at least 32")
        device = check_device("device", args.device)
        check_descriptor_name("descriptor", args.descriptor)
        for name in args.compare:
            check_descriptor_name("compare", name)
        out = check_output_file("out", args.out)
        check(out.suffix.lower() == ".png", "out", args.out, "must end with .png")
        grays = [_read_gray("image1", args.image1), _read_gray("image2", args.image2)]
    except OptionError as err:
        return report(err, parser)
    sizes = [f"{g.shape[1]}x{g.shape[0]}" for g in grays]
    grays = [resize_to_max(g, args.max_size or None)[0] for g in grays]
    sizes = [s if s == f"{g.shape[1]}x{g.shape[0]}" else f"{s}, used at {g.shape[1]}x{g.shape[0]}" for s, g in zip(sizes, grays)]
    kps = [detect_keypoints(g, args.max_keypoints) for g in grays]
    num_kps = (len(kps[0]), len(kps[1]))
    results = []
    try:
        for name in names:
            descriptor = create_descriptor(name, device=str(device))
            results.append(match_pair(name, descriptor, *grays, *kps, args.geometry, args.threshold, args.seed))
    except TooFewMatchesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.image1} ({sizes[0]}) - {args.image2} ({sizes[1]}), {args.geometry} RANSAC {args.threshold:g} px, seed {args.seed}")
    print(format_table(results, num_kps))
    panels = [
        draw_panel(*grays, *kps, r, panel_title(r, num_kps, args.geometry, args.threshold), args.show_outliers)
        for r in results
    ]
    write_png(out, np.vstack(panels))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
