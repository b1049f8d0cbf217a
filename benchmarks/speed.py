"""Time a descriptor's ``compute`` next to OpenCV SIFT's on the same keypoints.

Usage::

    python -m benchmarks.speed                                   # shipped Exemplar model, skimage photo
    python -m benchmarks.speed --image ../shared/data/oxford/graf/img1.ppm --descriptor tfeat
    python -m benchmarks.speed --device cuda

Both descriptors describe the same 2000 SIFT keypoints of one 800x640 image in the same
process; after one warm-up call each, ``--repeats`` calls of each are timed alternately
and the medians are reported, with their ratio and descriptors per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import cv2
import numpy as np

from .descriptors import build_descriptors, catalogue
from .matching import detect
from .synthetic import sample_photo

__all__ = ["time_compute", "main"]

IMAGE_SIZE = (800, 640)  # (width, height), graf img1's size


def time_compute(descriptor, image: np.ndarray, keypoints: list[cv2.KeyPoint], repeats: int) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``descriptor.compute(image, keypoints)``; warm up before."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        descriptor.compute(image, keypoints)
        times.append(time.perf_counter() - start)
    return times


def _default_descriptor() -> tuple[str, str | None]:
    names, unavailable = catalogue()
    exemplar = [n for n in names if n.startswith("exemplar") and n not in unavailable]
    if exemplar:
        return exemplar[0], None
    return "kornia:sift", f"no shipped Exemplar model ({unavailable.get('exemplar')}); timing kornia:sift instead"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 1 descriptor unavailable, 2 bad arguments)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--descriptor", help="descriptor name (default: the first shipped Exemplar model); see "
                   "python -m benchmarks.matching --list")
    p.add_argument("--image", help="image file (e.g. graf img1.ppm); default: skimage's astronaut resized to 800x640")
    p.add_argument("--num-features", type=int, default=2000, help="SIFT keypoints (default 2000)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each descriptor (default 5)")
    p.add_argument("--device", default="cpu", help="torch device of a network descriptor: cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.image:
        image = cv2.imread(args.image, cv2.IMREAD_GRAYSCALE)
        if image is None:
            print(f"error: cannot read image {args.image}", file=sys.stderr)
            return 2
    else:
        image = cv2.resize(cv2.cvtColor(sample_photo("astronaut"), cv2.COLOR_BGR2GRAY), IMAGE_SIZE, interpolation=cv2.INTER_CUBIC)
    name, note = (args.descriptor, None) if args.descriptor else _default_descriptor()
    if note:
        print(note)
    try:
        built, skipped = build_descriptors([name], device=args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if name not in built:
        print(f"error: {name} unavailable: {skipped[name]}", file=sys.stderr)
        return 1
    descriptor, sift = built[name], cv2.SIFT_create()
    keypoints, _ = detect(image, "sift", args.num_features)
    n = len(descriptor.compute(image, keypoints)[0])  # warm-up, and the count it describes
    sift.compute(image, keypoints)
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate, so background load affects both alike
        ours += time_compute(descriptor, image, keypoints, 1)
        theirs += time_compute(sift, image, keypoints, 1)
    t_ours, t_sift = statistics.median(ours), statistics.median(theirs)
    print(f"image {image.shape[1]}x{image.shape[0]}, {len(keypoints)} SIFT keypoints, device {args.device}, "
          f"median of {args.repeats} runs after a warm-up")
    print(f"{name:>16s}: {1000 * t_ours:9.1f} ms  {n / t_ours:10.0f} descriptors/s")
    print(f"{'cv2 SIFT':>16s}: {1000 * t_sift:9.1f} ms  {len(keypoints) / t_sift:10.0f} descriptors/s")
    print(f"{'ratio':>16s}: {t_ours / t_sift:9.2f} x SIFT's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
