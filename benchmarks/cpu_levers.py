"""CPU speed levers of the Exemplar descriptor, timed in one process against OpenCV SIFT.

Usage::

    python -m benchmarks.cpu_levers --image ../shared/data/oxford/graf/img1.ppm --repeats 15

Variants of ``ExemplarDescriptor.compute`` on the same keypoints: float32 (channels-last,
the default), float32 with contiguous (NCHW) tensors, bfloat16 convolutions, and 1 or 2
torch threads; SIFT's ``compute`` runs in every round. Rounds alternate all variants, so
background load hits them alike; reported are the median time and the median over rounds
of the time / SIFT's time of the same round. ``--int8`` adds static int8 post-training
quantisation of the convolutions (torch.ao, x86 backend, calibrated on the image's own
patches) and reports its cosine similarity to float32 (descriptors are unit vectors).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import cv2
import numpy as np
import torch

from exemplar_desc import ExemplarDescriptor
from exemplar_desc.cli import ArgumentParser, report
from exemplar_desc.checks import check, check_number
from exemplar_desc.patches import build_pyramid, extract_patches, gray_tensor, keypoint_frames, keypoints_to_arrays, normalize_patches

__all__ = ["int8_descriptor", "main"]


def int8_descriptor(descriptor: ExemplarDescriptor, image: np.ndarray, keypoints: list[cv2.KeyPoint]) -> ExemplarDescriptor:
    """``descriptor`` (float32, on the CPU) with its convolutions statically quantised to int8 (x86), in place.

    The activation ranges are calibrated on the patches of ``keypoints`` in ``image``; pass a
    descriptor of its own, not one still used in float32.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    xy, size, angle = keypoints_to_arrays(keypoints)
    frames = keypoint_frames(size, angle, descriptor.magnification)
    patches = normalize_patches(extract_patches(build_pyramid(gray_tensor(image)), xy, frames, descriptor.patch_size))
    trunk = torch.nn.Sequential(*copy.deepcopy(descriptor.net.trunk.blocks)).eval()
    prepared = prepare_fx(trunk, get_default_qconfig_mapping("x86"), (patches[:8],))
    with torch.inference_mode():
        for start in range(0, len(patches), 256):  # calibration: activation ranges on real patches
            prepared(patches[start : start + 256])
    descriptor.net = _QuantisedNet(convert_fx(prepared), descriptor.net.head)
    return descriptor


class _QuantisedNet(torch.nn.Module):
    """An int8 trunk (float in and out, quantised inside) followed by the float32 head."""

    def __init__(self, trunk: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(patches.contiguous()).float())


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns 0, or 2 for a bad option."""
    p = ArgumentParser(prog="python -m benchmarks.cpu_levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="image file, e.g. graf img1.ppm")
    p.add_argument("--num-features", type=int, default=2000, help="SIFT keypoints (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="rounds (default: %(default)s)")
    p.add_argument("--int8", action="store_true", help="also time int8 post-training quantisation")
    args = p.parse_args(argv)
    try:
        check_number("num_features", args.num_features, low=1, integer=True)
        check_number("repeats", args.repeats, low=1, integer=True)
        image = cv2.imread(args.image, cv2.IMREAD_GRAYSCALE)
        check(image is not None, "image", args.image, "cannot be read as an image")
    except ValueError as err:
        return report(err, p)
    keypoints = cv2.SIFT_create(nfeatures=args.num_features).detect(image, None)
    sift = cv2.SIFT_create()
    fp32, bf16 = ExemplarDescriptor(precision="fp32"), ExemplarDescriptor(precision="bf16")
    nchw = ExemplarDescriptor(precision="fp32")
    nchw.net.to(memory_format=torch.contiguous_format)
    variants = {"fp32": fp32, "fp32 NCHW": nchw, "bf16": bf16}
    if args.int8:
        variants["int8"] = int8_descriptor(ExemplarDescriptor(precision="fp32"), image, keypoints)
    reference = fp32.compute(image, keypoints)[1]
    threads = torch.get_num_threads()
    calls = {(name, t): d for name, d in variants.items() for t in sorted({1, threads})}
    times: dict[object, list[float]] = {key: [] for key in [*calls, "sift"]}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for key in times:
            if key == "sift":
                start = time.perf_counter()
                sift.compute(image, keypoints)
            else:
                torch.set_num_threads(key[1])
                start = time.perf_counter()
                calls[key].compute(image, keypoints)
            if round_:
                times[key].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    print(f"image {image.shape[1]}x{image.shape[0]}, {len(keypoints)} SIFT keypoints, {args.repeats} rounds; "
          f"SIFT median {1000 * statistics.median(times['sift']):.1f} ms")
    print(f"{'variant':<12s} {'threads':>7s} {'median ms':>10s} {'x SIFT':>7s} {'min cos':>8s} {'median cos':>10s}")
    for (name, t), descriptor in calls.items():
        ratio = statistics.median(a / b for a, b in zip(times[(name, t)], times["sift"]))
        cos = np.sum(descriptor.compute(image, keypoints)[1] * reference, axis=1)
        print(f"{name:<12s} {t:>7d} {1000 * statistics.median(times[(name, t)]):>10.1f} {ratio:>6.2f}x "
              f"{cos.min():>8.5f} {np.median(cos):>10.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
