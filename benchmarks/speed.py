"""Time a descriptor's ``compute`` next to OpenCV SIFT's on the same keypoints.

Usage::

    python -m benchmarks.speed                                   # shipped Exemplar model, skimage photo
    python -m benchmarks.speed --image ../shared/data/oxford/graf/img1.ppm --precision fp32
    python -m benchmarks.speed --device cuda --counts 2000,8000,32000 --images 16

For each count N of ``--counts`` both descriptors describe the same N keypoints of one
image (SIFT's strongest; where the image has fewer, its keypoints are repeated, which
costs the same per keypoint), then ``--images`` copies of the image with ``--num-features``
keypoints each in one list call (OpenCV's many-image convention; SIFT loops over them).
After one warm-up call each, ``--repeats`` calls of each are timed alternately and the
medians are reported, with descriptors per second and the ratio of the times. For an
Exemplar descriptor the time of one call is then split into its stages (upload, pyramid,
sampling, network, download), and on CUDA the network alone is timed on resident patches.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import cv2
import numpy as np
import torch

from exemplar_desc import ExemplarDescriptor
from exemplar_desc.registry import is_exemplar
from exemplar_desc.cli import ArgumentParser, add_shared_options, report
from exemplar_desc.checks import OptionError, check, check_device, check_number
from exemplar_desc.patches import build_pyramid, extract_patches, gray_tensor, keypoint_frames, keypoints_to_arrays, normalize_patches

from .descriptors import build_descriptors, catalogue
from .matching import detect
from .synthetic import sample_photo

__all__ = ["time_calls", "stage_times", "main"]

IMAGE_SIZE = (800, 640)  # (width, height), graf img1's size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall-clock seconds of each call over ``repeats`` rounds, after one warm-up each.

    The calls alternate within a round, so background load affects all of them alike.
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def stage_times(descriptor: ExemplarDescriptor, image: np.ndarray, keypoints: list[cv2.KeyPoint], repeats: int) -> dict[str, float]:
    """Median seconds of each stage of :meth:`ExemplarDescriptor.compute` on one image.

    Stages: ``upload`` (grey conversion on the device, with the transfer), ``pyramid``,
    ``sampling`` (patches and standardisation), ``network`` (trunk and head), ``download``;
    each is synchronised on CUDA, so the sum exceeds a pipelined call slightly.
    """
    device, bs = descriptor.device, descriptor.batch_size
    xy, size, angle = keypoints_to_arrays(keypoints)
    frames = torch.from_numpy(keypoint_frames(size, angle, descriptor.magnification)).to(device)
    centers = torch.from_numpy(xy).to(device)
    state: dict[str, object] = {}

    def upload():
        state["gray"] = gray_tensor(image, device)

    def pyramid():
        state["pyramid"] = build_pyramid(state["gray"])

    def sampling():
        state["patches"] = [normalize_patches(extract_patches(state["pyramid"], centers[s : s + bs], frames[s : s + bs],
                                                              descriptor.patch_size)) for s in range(0, len(xy), bs)]

    def network():
        state["desc"] = torch.cat([descriptor.net(p.contiguous(memory_format=torch.channels_last)) for p in state["patches"]])

    def download():
        state["desc"].cpu().numpy()

    stages = {"upload": upload, "pyramid": pyramid, "sampling": sampling, "network": network, "download": download}
    times: dict[str, list[float]] = {name: [] for name in stages}
    for round_ in range(repeats + 1):  # the first round warms up
        for name, stage in stages.items():
            _sync(device)
            start = time.perf_counter()
            stage()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _keypoints(image: np.ndarray, count: int) -> list[cv2.KeyPoint]:
    """``count`` SIFT keypoints: the strongest, repeated when the image has fewer."""
    found = list(detect(image, "sift", count)[0])
    if not found:
        raise ValueError("SIFT finds no keypoint in the image")
    return (found * (count // len(found) + 1))[:count]


def _default_descriptor() -> tuple[str, str | None]:
    names, unavailable = catalogue()
    exemplar = [n for n in names if n.startswith("exemplar") and n not in unavailable]
    if exemplar:
        return exemplar[0], None
    return "kornia:sift", f"no shipped Exemplar model ({unavailable.get('exemplar')}); timing kornia:sift instead"


def _parse_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise OptionError("counts", text, "must be comma-separated whole numbers, e.g. 2000,8000,32000") from None
    for c in counts:
        check_number("counts", c, low=1, integer=True)
    return counts


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--descriptor", help="descriptor name (default: the default shipped model); see "
                   "python -m benchmarks.matching --list")
    p.add_argument("--image", help="image file (e.g. graf img1.ppm); default: skimage's astronaut resized to 800x640")
    p.add_argument("--counts", default="2000,8000,32000", help="keypoints per image to time (default: %(default)s)")
    p.add_argument("--images", type=int, default=16, help="images of --num-features keypoints in one list call, 0 to skip "
                   "(default: %(default)s)")
    p.add_argument("--num-features", type=int, default=2000, help="keypoints per image of the list call and the split "
                   "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each descriptor (default: %(default)s)")
    add_shared_options(p, "--device", "--precision")
    p.add_argument("--batch-size", type=int, default=None, help="Exemplar patches per network batch (default: 1024, 8192 on CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def _check_args(args) -> tuple[list[int], torch.device, np.ndarray]:
    """The counts, the device and the grey image; OptionError naming the first bad option's destination."""
    counts = _parse_counts(args.counts)
    check_number("images", args.images, low=0, integer=True)
    check_number("num_features", args.num_features, low=1, integer=True)
    check_number("repeats", args.repeats, low=1, integer=True)
    if args.threads is not None:
        check_number("threads", args.threads, low=1, integer=True)
    if args.batch_size is not None:
        check_number("batch_size", args.batch_size, low=1, integer=True)
    device = check_device("device", args.device)
    if args.image:
        image = cv2.imread(args.image, cv2.IMREAD_GRAYSCALE)
        check(image is not None, "image", args.image, "cannot be read as an image")
    else:
        image = cv2.resize(cv2.cvtColor(sample_photo("astronaut"), cv2.COLOR_BGR2GRAY), IMAGE_SIZE,
                           interpolation=cv2.INTER_CUBIC)
    return counts, device, image


def _print_times(descriptor, exemplar: bool, image: np.ndarray, cases: list[tuple[int, int]], repeats: int) -> None:
    """One table row per (keypoints per image, images) case: the descriptor's and SIFT's median times."""
    sift = cv2.SIFT_create()
    for n, m in cases:
        kps = _keypoints(image, n)
        if m == 1:
            calls = {"ours": lambda: descriptor.compute(image, kps), "sift": lambda: sift.compute(image, kps)}
        else:
            many = (lambda: descriptor.compute([image] * m, [kps] * m)) if exemplar else \
                (lambda: [descriptor.compute(image, kps) for _ in range(m)])
            calls = {"ours": many, "sift": lambda: [sift.compute(image, kps) for _ in range(m)]}
        t = time_calls(calls, repeats)
        total = n * m
        print(f"{n:>10d} {m:>6d} {1000 * t['ours']:>24.1f} {total / t['ours']:>9.0f} {1000 * t['sift']:>9.1f} "
              f"{total / t['sift']:>9.0f} {t['ours'] / t['sift']:>5.2f}x")


def _print_split(descriptor: ExemplarDescriptor, image: np.ndarray, num_features: int, repeats: int) -> None:
    """The stages of one call at ``num_features`` keypoints, and on CUDA the network alone on resident patches."""
    kps = _keypoints(image, num_features)
    split = stage_times(descriptor, image, kps, repeats)
    print(f"split at {num_features} keypoints (ms): " + ", ".join(f"{stage} {1000 * s:.2f}" for stage, s in split.items()))
    device = descriptor.device
    if device.type == "cuda":
        patches = torch.randn(descriptor.batch_size, 1, descriptor.patch_size, descriptor.patch_size, device=device)
        patches = patches.contiguous(memory_format=torch.channels_last)

        def network():
            with torch.inference_mode():
                descriptor.net(patches)
            torch.cuda.synchronize(device)

        alone = time_calls({"net": network}, repeats)["net"]
        print(f"network alone: {1000 * alone:.2f} ms per batch of {descriptor.batch_size}, "
              f"{descriptor.batch_size / alone:.0f} patches/s")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 1 descriptor unavailable, 2 bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        counts, device, image = _check_args(args)
        name, note = (args.descriptor, None) if args.descriptor else _default_descriptor()
        exemplar = is_exemplar(name)
        options = {"precision": args.precision, "batch_size": args.batch_size or (8192 if device.type == "cuda" else 1024)}
        built, skipped = build_descriptors([name], device=str(device), **(options if exemplar else {}))
    except ValueError as err:
        return report(err, parser)
    if name not in built:
        print(f"error: {name} unavailable: {skipped[name]}", file=sys.stderr)
        return 1
    if note:
        print(note)
    if args.threads:
        torch.set_num_threads(args.threads)
    descriptor = built[name]
    cpu = "" if device.type == "cuda" else f", {torch.get_num_threads()} torch threads"
    print(f"image {image.shape[1]}x{image.shape[0]}, device {device}{cpu}"
          + (f", precision {descriptor.precision}, batch {descriptor.batch_size}" if exemplar else "")
          + f"; median of {args.repeats} runs after a warm-up")
    print(f"{'keypoints':>10s} {'images':>6s} {name + ' ms':>24s} {'desc/s':>9s} {'SIFT ms':>9s} {'desc/s':>9s} {'ratio':>6s}")
    cases = [(n, 1) for n in counts] + ([(args.num_features, args.images)] if args.images else [])
    _print_times(descriptor, exemplar, image, cases, args.repeats)
    if exemplar:
        _print_split(descriptor, image, args.num_features, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
