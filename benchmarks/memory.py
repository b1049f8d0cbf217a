"""Peak memory of ``ExemplarDescriptor.compute`` on one large image with many keypoints.

Usage::

    python -m benchmarks.memory                                  # 100,000 keypoints on a 4000x3000 image
    python -m benchmarks.memory --width 1000 --height 800 --keypoints 20000 --batch-size 256

Prints the resident set size before the call (model, image and keypoints loaded) and the
peak during it (``VmHWM`` of /proc/self/status, the kernel's high-water mark), so "extra"
is what describing costs. Run it in a fresh process: the peak covers the process's life.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from exemplar_desc.cli import ArgumentParser, report
from exemplar_desc.checks import check_number

__all__ = ["rss_mib", "main"]


def rss_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process, MiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns 0, or 2 for a bad option."""
    p = ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--keypoints", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--model", default=None, help="Exemplar model (default: the shipped default)")
    args = p.parse_args(argv)
    try:
        for option in ("width", "height", "keypoints", "batch_size"):
            check_number(option, getattr(args, option), low=16 if option != "keypoints" else 1, integer=True)
    except ValueError as err:
        return report(err, p)
    import torch

    from exemplar_desc import ExemplarDescriptor

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (args.height, args.width), dtype=np.uint8), (0, 0), 2)
    xy = rng.uniform(0, [args.width, args.height], (args.keypoints, 2))
    sizes = rng.uniform(2, 60, args.keypoints)
    angles = rng.uniform(0, 360, args.keypoints)
    keypoints = [cv2.KeyPoint(float(x), float(y), float(s), float(a)) for (x, y), s, a in zip(xy, sizes, angles)]
    descriptor = ExemplarDescriptor(args.model, batch_size=args.batch_size)
    descriptor.compute(image[:64, :64], keypoints[:8])  # warm-up: oneDNN kernels, allocator pools
    before, _ = rss_mib()
    _reset_peak()
    _, desc = descriptor.compute(image, keypoints)
    _, peak = rss_mib()
    print(f"image {args.width}x{args.height}, {len(desc)} keypoints, batch_size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"RSS before {before:.0f} MiB, peak during compute {peak:.0f} MiB, extra {peak - before:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
