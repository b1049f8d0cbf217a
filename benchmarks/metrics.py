"""Descriptor matching metrics for an image pair related by a known homography.

Conventions: points are (N, 2) float arrays of pixel coordinates (x, y) with pixel
centres at integer coordinates (OpenCV's); descriptors are (N, D) float arrays compared
by Euclidean distance; ``H`` maps image-1 pixels to image-2 pixels. Ellipses are (N, 5)
rows ``(x, y, a, b, c)`` meaning the region ``a dx^2 + 2 b dx dy + c dy^2 <= 1`` around
the centre (the Oxford benchmark's format). docs/benchmark.md defines
every metric in words; the functions here are those definitions.
"""

from __future__ import annotations

import cv2
import numpy as np

from exemplar_desc.checks import check_number
from exemplar_desc.matching import mutual_nearest_neighbours, nearest_neighbours

__all__ = [
    "MMA_THRESHOLDS",
    "HOMOGRAPHY_THRESHOLDS",
    "project",
    "covisible",
    "reprojection_errors",
    "project_ellipses",
    "ellipse_overlaps",
    "nearest_neighbours",
    "mutual_nearest_neighbours",
    "average_precision",
    "mean_matching_accuracy",
    "corner_error",
    "fit_homography",
    "homography_accuracy",
    "evaluate_pair",
]

MMA_THRESHOLDS = tuple(range(1, 11))  # pixels
HOMOGRAPHY_THRESHOLDS = (1, 3, 5, 10)  # pixels, mean corner error
#: Per-pair homography keys: accuracy at each threshold, then their mean ("H mean").
HOMOGRAPHY_KEYS = (*(f"H@{t}px" for t in HOMOGRAPHY_THRESHOLDS), "H_mean")
#: The robust fit of the homography: MAGSAC++ with these settings (see :func:`fit_homography`).
HOMOGRAPHY_FIT = {"method": "MAGSAC++ (OpenCV USAC_MAGSAC)", "threshold_px": 3.0, "max_iters": 10_000,
                  "confidence": 0.999, "seed": 0}


def project(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a (3, 3) homography to (N, 2) points; returns (N, 2) float64."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    p = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ np.asarray(H, dtype=np.float64).T
    w = p[:, 2:3]
    w = np.where(np.abs(w) < 1e-12, 1e-12, w)
    return p[:, :2] / w


def covisible(xy: np.ndarray, H: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N,) bool: the points map by ``H`` inside an image of ``shape`` = (H, W)."""
    q = project(H, xy)
    h, w = shape[:2]
    return (q[:, 0] >= -0.5) & (q[:, 0] <= w - 0.5) & (q[:, 1] >= -0.5) & (q[:, 1] <= h - 0.5)


def reprojection_errors(xy1: np.ndarray, xy2: np.ndarray, H: np.ndarray, symmetric: bool) -> np.ndarray:
    """Pairwise reprojection errors in pixels, (N1, N2) float64.

    One-way: ``|H x1 - x2|`` (in image 2). Symmetric: the larger of that and
    ``|H^-1 x2 - x1|`` (in image 1), so a match must be close in both images.
    """
    err = np.linalg.norm(project(H, xy1)[:, None, :] - np.asarray(xy2, np.float64)[None, :, :], axis=2)
    if symmetric:
        back = np.linalg.norm(np.asarray(xy1, np.float64)[:, None, :] - project(np.linalg.inv(H), xy2)[None], axis=2)
        err = np.maximum(err, back)
    return err


def _jacobian(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2, 2) Jacobian of the homography at each point (its local affine approximation)."""
    H = np.asarray(H, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    w = H[2, 0] * x + H[2, 1] * y + H[2, 2]
    u = (H[0, 0] * x + H[0, 1] * y + H[0, 2]) / w
    v = (H[1, 0] * x + H[1, 1] * y + H[1, 2]) / w
    J = np.empty((len(xy), 2, 2))
    J[:, 0, 0] = (H[0, 0] - u * H[2, 0]) / w
    J[:, 0, 1] = (H[0, 1] - u * H[2, 1]) / w
    J[:, 1, 0] = (H[1, 0] - v * H[2, 0]) / w
    J[:, 1, 1] = (H[1, 1] - v * H[2, 1]) / w
    return J


def _ellipse_matrices(ellipses: np.ndarray) -> np.ndarray:
    e = np.asarray(ellipses, dtype=np.float64)
    return np.stack([np.stack([e[:, 2], e[:, 3]], -1), np.stack([e[:, 3], e[:, 4]], -1)], -2)


def project_ellipses(H: np.ndarray, ellipses: np.ndarray) -> np.ndarray:
    """Map (N, 5) ellipses into image 2 with the homography's local affine approximation at each centre."""
    ellipses = np.asarray(ellipses, dtype=np.float64).reshape(-1, 5)
    centres = project(H, ellipses[:, :2])
    Jinv = np.linalg.inv(_jacobian(H, ellipses[:, :2]))
    A = np.transpose(Jinv, (0, 2, 1)) @ _ellipse_matrices(ellipses) @ Jinv
    return np.column_stack([centres, A[:, 0, 0], A[:, 0, 1], A[:, 1, 1]])


def ellipse_overlaps(ellipses1: np.ndarray, ellipses2: np.ndarray, grid: int = 40, chunk: int = 4096) -> np.ndarray:
    """Pairwise intersection-over-union of ellipses in the same image, (N1, N2) float64.

    Computed by counting points of a ``grid`` x ``grid`` lattice over the pair's joint
    bounding box (accuracy about 1/grid); pairs whose centres are farther apart than the
    sum of their largest semi-axes cannot intersect and get 0 without counting.
    """
    A1, A2 = _ellipse_matrices(ellipses1), _ellipse_matrices(ellipses2)
    c1, c2 = np.asarray(ellipses1, np.float64)[:, :2], np.asarray(ellipses2, np.float64)[:, :2]
    cov1, cov2 = np.linalg.inv(A1), np.linalg.inv(A2)  # half-extents along x/y are sqrt of the diagonal
    r1 = np.sqrt(np.linalg.eigvalsh(cov1)[:, -1])
    r2 = np.sqrt(np.linalg.eigvalsh(cov2)[:, -1])
    out = np.zeros((len(c1), len(c2)))
    dist = np.linalg.norm(c1[:, None] - c2[None], axis=2)
    i_all, j_all = np.nonzero(dist < r1[:, None] + r2[None, :])
    t = (np.arange(grid) + 0.5) / grid
    for s in range(0, len(i_all), chunk):
        i, j = i_all[s : s + chunk], j_all[s : s + chunk]
        ext1 = np.sqrt(np.stack([cov1[i, 0, 0], cov1[i, 1, 1]], -1))
        ext2 = np.sqrt(np.stack([cov2[j, 0, 0], cov2[j, 1, 1]], -1))
        lo = np.minimum(c1[i] - ext1, c2[j] - ext2)
        hi = np.maximum(c1[i] + ext1, c2[j] + ext2)
        gx = lo[:, 0, None] + (hi - lo)[:, 0, None] * t[None]  # (K, G)
        gy = lo[:, 1, None] + (hi - lo)[:, 1, None] * t[None]

        def inside(c: np.ndarray, A: np.ndarray) -> np.ndarray:
            dx = gx[:, None, :] - c[:, 0, None, None]  # (K, 1, G) varies along x
            dy = gy[:, :, None] - c[:, 1, None, None]  # (K, G, 1) varies along y
            q = A[:, 0, 0, None, None] * dx**2 + 2 * A[:, 0, 1, None, None] * dx * dy + A[:, 1, 1, None, None] * dy**2
            return q <= 1.0

        in1, in2 = inside(c1[i], A1[i]), inside(c2[j], A2[j])
        inter = (in1 & in2).sum(axis=(1, 2))
        union = (in1 | in2).sum(axis=(1, 2))
        out[i, j] = inter / np.maximum(union, 1)
    return out


def average_precision(distances: np.ndarray, correct: np.ndarray, num_positives: int) -> float:
    """Area under the precision-recall curve of matches ranked by increasing distance.

    ``AP = (1 / P) * sum_k precision@k * correct_k`` over the ranked matches, with
    ``precision@k`` the fraction of correct matches among the first k and P the number of
    queries that have a correct match at all (so recall reaches 1 only if all of them are
    found). Ties are ranked in input order. Returns NaN when ``num_positives`` is 0.
    """
    if num_positives <= 0:
        return float("nan")
    order = np.argsort(np.asarray(distances), kind="stable")
    hits = np.asarray(correct, dtype=bool)[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / num_positives)


def mean_matching_accuracy(errors: np.ndarray, thresholds=MMA_THRESHOLDS) -> np.ndarray:
    """Fraction of matches with reprojection error <= t for each threshold t (pixels); zeros if no match."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        return np.zeros(len(thresholds))
    return np.array([(errors <= t).mean() for t in thresholds])


def corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, shape: tuple[int, int]) -> float:
    """Mean distance in pixels between image 1's four corners mapped by ``H_est`` and by ``H_gt``; inf if no estimate."""
    if H_est is None:
        return float("inf")
    h, w = shape[:2]
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float64)
    return float(np.linalg.norm(project(H_est, corners) - project(H_gt, corners), axis=1).mean())


def fit_homography(
    pts1: np.ndarray,
    pts2: np.ndarray,
    seed: int = HOMOGRAPHY_FIT["seed"],
    threshold: float = HOMOGRAPHY_FIT["threshold_px"],
    max_iters: int = HOMOGRAPHY_FIT["max_iters"],
    confidence: float = HOMOGRAPHY_FIT["confidence"],
) -> np.ndarray | None:
    """MAGSAC++ homography from (M, 2) matched pixel coordinates of images 1 and 2.

    OpenCV's ``cv2.USAC_MAGSAC`` settings (uniform sampling, MAGSAC++ score, sigma-consensus++
    local optimisation on 75-point samples, 15 iterations), given through ``cv2.UsacParams`` so
    that ``seed`` reaches USAC's own random generator: USAC never draws from ``cv2.theRNG()``,
    so ``cv2.setRNGSeed`` does not change its result, and the ``cv2.USAC_MAGSAC`` flag always
    seeds it with 0. Seed 0 gives what the flag gives; one seed always gives the same H.

    Args:
        pts1, pts2: (M, 2) points in pixels, row i of each a match.
        seed: state of USAC's random generator (0 <= seed < 2**31).
        threshold: reprojection error in pixels (> 0) under which a match is an inlier in the
            sample-consensus steps (MAGSAC++ marginalises the noise scale up to the larger of
            this and OpenCV's own bound).
        max_iters: the most samples drawn (>= 1).
        confidence: probability in (0, 1) of having drawn an outlier-free sample before stopping early.

    Returns:
        (3, 3) float64 H mapping image-1 pixels to image-2 pixels with H[2, 2] = 1, or None with
        fewer than 4 matches or when no model is found.

    Raises:
        OptionError (a ValueError): a bad argument, named.
    """
    check_number("seed", seed, low=0, high=2**31 - 1, integer=True)
    check_number("threshold", threshold, low=0, low_open=True)
    check_number("max_iters", max_iters, low=1, integer=True)
    check_number("confidence", confidence, low=0, high=1, low_open=True, high_open=True)
    if len(pts1) < 4:
        return None
    params = cv2.UsacParams()
    params.sampler, params.score, params.loMethod = cv2.SAMPLING_UNIFORM, cv2.SCORE_METHOD_MAGSAC, cv2.LOCAL_OPTIM_SIGMA
    params.loSampleSize, params.loIterations = 75, 15
    params.threshold, params.maxIterations, params.confidence = float(threshold), int(max_iters), float(confidence)
    params.randomGeneratorState = int(seed)
    H_est, _ = cv2.findHomography(np.float32(pts1).reshape(-1, 2), np.float32(pts2).reshape(-1, 2), params)
    return H_est


def homography_accuracy(error: float) -> dict[str, float]:
    """``{"H@<t>px": 1.0 if error <= t else 0.0}`` for t in :data:`HOMOGRAPHY_THRESHOLDS`, and
    ``"H_mean"``, their mean; ``error`` is a mean corner error in pixels (inf: no estimate)."""
    hits = {f"H@{t}px": float(error <= t) for t in HOMOGRAPHY_THRESHOLDS}
    return {**hits, "H_mean": float(np.mean(list(hits.values())))}


def evaluate_pair(
    xy1: np.ndarray,
    xy2: np.ndarray,
    desc1: np.ndarray,
    desc2: np.ndarray,
    H: np.ndarray,
    shape1: tuple[int, int],
    shape2: tuple[int, int],
    pixel_threshold: float = 3.0,
    ellipses1: np.ndarray | None = None,
    ellipses2: np.ndarray | None = None,
    overlap_threshold: float = 0.5,
    ratio: float | None = None,
) -> dict:
    """All metrics of one image pair.

    Args:
        xy1, xy2: (N1, 2), (N2, 2) keypoint centres in pixels.
        desc1, desc2: (N1, D), (N2, D) descriptors of those keypoints, compared by L2 distance.
        H: (3, 3) ground truth, image 1 to image 2.
        shape1, shape2: (height, width) of the images.
        pixel_threshold: symmetric reprojection error (pixels) under which a match is
            correct for mAP and matching score.
        ellipses1, ellipses2: (N, 5) regions; when given, a match is correct for mAP and
            matching score if the overlap (IoU) of the projected region 1 with region 2 is
            at least ``overlap_threshold`` instead.
        ratio: Lowe ratio in (0, 1] applied to the mutual matches of MMA, homography and
            the correct-match statistics (None: mutual nearest neighbours only; mAP and
            matching score never use it).

    Returns:
        ``{"mAP", "matching_score", "MMA": [10 floats for 1..10 px], "homography_error"
        (mean corner error in px of :func:`fit_homography`'s estimate, inf if none), "H@1px",
        "H@3px", "H@5px", "H@10px" (0/1), "H_mean" (their mean), "num_keypoints":
        [N1, N2], "num_covisible": [...], "num_positives", "num_mutual_matches",
        "num_correct_matches" (matches with a one-way error <= ``pixel_threshold``),
        "inlier_error" (their mean one-way error in pixels, NaN if none)}``.
    """
    xy1, xy2 = np.asarray(xy1, np.float64).reshape(-1, 2), np.asarray(xy2, np.float64).reshape(-1, 2)
    desc1, desc2 = np.asarray(desc1, np.float32), np.asarray(desc2, np.float32)
    # mAP and matching score: only keypoints that can have a correspondence (covisible region).
    vis1 = np.nonzero(covisible(xy1, H, shape2))[0]
    vis2 = np.nonzero(covisible(xy2, np.linalg.inv(H), shape1))[0]
    if ellipses1 is not None and ellipses2 is not None:
        truth = ellipse_overlaps(project_ellipses(H, ellipses1[vis1]), np.asarray(ellipses2)[vis2]) >= overlap_threshold
    else:
        truth = reprojection_errors(xy1[vis1], xy2[vis2], H, symmetric=True) <= pixel_threshold
    nn, dist = nearest_neighbours(desc1[vis1], desc2[vis2])
    correct = truth[np.arange(len(nn)), nn] if len(nn) else np.zeros(0, bool)
    num_positives = int(truth.any(axis=1).sum()) if truth.size else 0
    ap = average_precision(dist, correct, num_positives)
    mutual_vis, _ = mutual_nearest_neighbours(desc1[vis1], desc2[vis2])
    n_correct = int(truth[mutual_vis[:, 0], mutual_vis[:, 1]].sum()) if len(mutual_vis) else 0
    denominator = min(len(vis1), len(vis2))
    matching_score = n_correct / denominator if denominator else 0.0
    # MMA and homography: mutual nearest neighbours over all keypoints, one-way error in image 2.
    matches, _ = mutual_nearest_neighbours(desc1, desc2, ratio=ratio)
    errors = np.linalg.norm(project(H, xy1[matches[:, 0]]) - xy2[matches[:, 1]], axis=1) if len(matches) else np.zeros(0)
    mma = mean_matching_accuracy(errors)
    # How precisely the correct matches are placed: what a reconstruction's reprojection error sees.
    inliers = errors[errors <= pixel_threshold]
    h_err = corner_error(fit_homography(xy1[matches[:, 0]], xy2[matches[:, 1]]), H, shape1)
    return {
        "mAP": ap,
        "matching_score": matching_score,
        "MMA": mma.tolist(),
        "homography_error": h_err,
        **homography_accuracy(h_err),
        "num_keypoints": [len(xy1), len(xy2)],
        "num_covisible": [len(vis1), len(vis2)],
        "num_positives": num_positives,
        "num_mutual_matches": len(matches),
        "num_correct_matches": len(inliers),
        "inlier_error": float(inliers.mean()) if len(inliers) else float("nan"),
    }
