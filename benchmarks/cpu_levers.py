"""CPU speed levers of the Exemplar descriptor, timed in one process against OpenCV SIFT.

Usage::

    python -m benchmarks.cpu_levers --image ../shared/data/oxford/graf/img1.ppm --repeats 15

Variants of ``ExemplarDescriptor.compute`` on the same keypoints: float32 (channels-last,
the default), float32 with contiguous (NCHW) tensors, bfloat16 convolutions, and 1 or 2
torch threads; SIFT's ``compute`` runs in every round. Rounds alternate all variants, so
background load hits them alike; reported are the median time and the median over rounds
of the time / SIFT's time of the same round. ``--int8`` adds the int8 convolutions
(``precision="int8"``, :mod:`exemplar_desc.int8`, with the ranges calibrated in the model
card); ``--qnnpack`` adds them packed for QNNPACK, ARM's quantised engine, whose portable
kernels give ARM's descriptors on any CPU (their time on x86 says nothing of ARM's); ``--onnx`` adds the model's ONNX file (:mod:`exemplar_desc.onnx_export`) run by OpenCV's
``cv2.dnn`` on the patches ``compute`` cuts, what an OpenCV program without torch runs
(docs/onnx.md). Every variant's cosine similarity to float32 is reported (descriptors are
unit vectors); the thread count applies to torch and OpenCV alike.

``--split`` instead says where one ``compute`` (float32, or ``--precision bf16``) spends
its time, on one thread: pyramid, sampling, standardisation, each convolution with its
rate in GFLOP/s, and the head, beside the rate of a float32 matrix product of the same work
(the third convolution's im2col shape), the most a float32 convolution can reach through a
matrix product. ``--shared`` adds the first convolution computed once per pyramid level and
sampled at each keypoint's outputs (:func:`first_conv_at_keypoints`), the computation
keypoints could share: only the first convolution is linear in the patch, so only it could
be shared under the per-patch standardisation (whose mean and deviation are left out of this
form's time, in its favour).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from exemplar_desc import ExemplarDescriptor
from exemplar_desc.cli import ArgumentParser, report
from exemplar_desc.int8 import ENGINES, Int8DescriptorNet
from exemplar_desc.checks import check, check_number
from exemplar_desc.onnx_export import export_onnx
from exemplar_desc.patches import build_pyramid, extract_patches, gray_tensor, keypoint_frames, keypoints_to_arrays, normalize_patches, \
    patch_levels

__all__ = ["main", "split_times", "level_maps", "first_conv_at_keypoints"]


def _keypoint_frames(descriptor: ExemplarDescriptor, keypoints: list[cv2.KeyPoint]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) centres and (N, 2, 2) patch frames of ``keypoints``, in pixels, as ``descriptor.compute`` cuts them."""
    xy, size, angle = keypoints_to_arrays(keypoints)
    return xy, keypoint_frames(size, None if descriptor.upright else angle, descriptor.magnification, descriptor.min_patch_side)


class _DnnVariant:
    """``descriptor``'s ONNX file in ``cv2.dnn``, on the (N, 1, P, P) patches in [0, 1] that ``descriptor.compute`` cuts."""

    def __init__(self, descriptor: ExemplarDescriptor, path: Path) -> None:
        self.descriptor, self.net = descriptor, cv2.dnn.readNetFromONNX(str(path))

    def compute(self, image: np.ndarray, keypoints: list[cv2.KeyPoint]) -> tuple[list[cv2.KeyPoint], np.ndarray]:
        xy, frames = _keypoint_frames(self.descriptor, keypoints)
        self.net.setInput(extract_patches(build_pyramid(gray_tensor(image)), xy, frames, self.descriptor.patch_size).numpy())
        return keypoints, self.net.forward()


def level_maps(conv: torch.nn.Conv2d, pyramid: list[torch.Tensor], levels: torch.Tensor) -> dict[int, torch.Tensor]:
    """``conv`` run once over each pyramid level in ``levels`` (cast to its dtype): {level: (1, C, H_c, W_c) map}.

    The maps are float32, as the patches are sampled (torch's CPU ``grid_sample`` in bfloat16 is slower and
    fails on expanded inputs), and channels-last: sampling C channels at a point then reads them together
    (3x faster on a CPU than NCHW).
    """
    return {lev: conv(pyramid[lev].to(conv.weight.dtype)).float().contiguous(memory_format=torch.channels_last)
            for lev in torch.unique(levels).tolist()}


def first_conv_at_keypoints(conv: torch.nn.Conv2d, maps: dict[int, torch.Tensor], centers: np.ndarray, frames: np.ndarray,
                            levels: torch.Tensor, patch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sample :func:`level_maps` at the outputs that ``conv`` would give on each keypoint's patch.

    Output ``(i, j)`` of ``conv`` on a patch is centred on patch pixel ``stride * (i, j) + (k - 1) / 2 - padding``;
    its point of the patch's frame is sampled (bilinear) from the map of the patch's level, whose output
    ``m`` is centred on that level's pixel ``stride * m + (k - 1) / 2 - padding``.

    Args:
        conv: the convolution (square kernel k, stride, padding).
        maps: :func:`level_maps` of ``conv``.
        centers: (N, 2) patch centres (x, y) in level-0 pixels.
        frames: (N, 2, 2) patch frames in level-0 pixels (:func:`exemplar_desc.patches.keypoint_frames`).
        levels: (N,) the patches' levels (:func:`exemplar_desc.patches.patch_levels`).
        patch_size: the patch's side P in pixels.

    Returns:
        One ``(indices, outputs)`` per level, the next layer's batches as they come (no gather): the (n,) int64
        indices of the level's patches and their (n, C, Q, Q) float32 outputs, Q the side of
        ``conv``'s output on a P x P patch. They equal ``conv`` on each patch where the output's window lies
        inside the patch and the patch's pixels fall on its level's.
    """
    k, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    q, offset = (patch_size + 2 * pad - k) // stride + 1, (k - 1) / 2 - pad
    cells = torch.as_tensor((2 * (stride * np.arange(q) + offset) + 1) / patch_size - 1, dtype=torch.float32)[None, :, None]
    # cells: (1, q, 1) patch coordinates in [-1, 1] of the outputs' centres
    centers, frames = torch.as_tensor(centers, dtype=torch.float64), torch.as_tensor(frames, dtype=torch.float64)
    out = []
    for lev, fmap in maps.items():
        idx = torch.nonzero(levels == lev).flatten()
        # Level-0 point p is the map's output index ((p + 0.5) / 2^lev - 0.5 - offset) / stride, which
        # grid_sample wants as (index + 0.5) / size * 2 - 1: one affine map per axis, folded into the
        # patch's centre and frame (float64), then summed over the q x q outputs in float32.
        size = torch.tensor(fmap.shape[-1:-3:-1], dtype=torch.float64)
        scale = 2 / (2.0**lev * stride * size)
        shift = ((0.5 / 2.0**lev - 0.5 - offset) / stride + 0.5) * 2 / size - 1
        origin, a = (centers[idx] * scale + shift).float(), (frames[idx] * scale[:, None]).float()
        rows, columns = a[:, None, :, 1] * cells, a[:, None, :, 0] * cells
        grid = origin[:, None, None] + rows[:, :, None] + columns[:, None, :]  # (n, q, q, 2)
        # One batch element per patch over the same map (expand: no copy), so the output needs no transpose.
        out.append((idx, F.grid_sample(fmap.expand(len(idx), -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                                       align_corners=False)))
    return out


@torch.inference_mode()
def split_times(descriptor: ExemplarDescriptor, image: np.ndarray, keypoints: list[cv2.KeyPoint],
                repeats: int, shared: bool = False) -> list[tuple[str, float, float | None]]:
    """Median milliseconds of each stage of ``descriptor.compute(image, keypoints)`` (one batch, CPU).

    The stages alternate within each round (:func:`benchmarks.speed.time_calls`).

    Returns:
        ``(stage, ms, GFLOP/s or None)`` rows: pyramid, sampling, standardisation, each
        convolution block (convolution, folded batch norm, ReLU), head, and last a float32
        matrix product with the FLOPs of the last convolution, ``(N h w, 9 C_in) @ (9 C_in, C_out)``;
        with ``shared``, then the first convolution once over each level that holds patches
        (:func:`level_maps`) and the sampling of its maps at the keypoints (:func:`first_conv_at_keypoints`).
    """
    from .speed import time_calls  # here, not at the top: benchmarks.speed imports this module

    gray = gray_tensor(image)
    xy, frames = _keypoint_frames(descriptor, keypoints)
    pyramid = build_pyramid(gray)
    raw = extract_patches(pyramid, xy, frames, descriptor.patch_size)
    maps = [normalize_patches(raw).contiguous(memory_format=torch.channels_last).to(descriptor.net.trunk.blocks[0][0].weight.dtype)]
    calls = {"pyramid": partial(build_pyramid, gray), "sampling": partial(extract_patches, pyramid, xy, frames, descriptor.patch_size),
             "standardisation": partial(normalize_patches, raw)}
    flops: dict[str, int] = {}
    for i, block in enumerate(descriptor.net.trunk.blocks):
        conv, x = block[0], maps[-1]
        maps.append(block(x))
        name = f"conv {i + 1} {conv.in_channels}->{conv.out_channels} on {x.shape[-1]}x{x.shape[-1]}"
        calls[name] = partial(block, x)
        flops[name] = 2 * maps[-1].numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    calls["head"] = partial(descriptor.net.describe_features, maps[-1])
    m, k, n = maps[-1].shape[0] * maps[-1].shape[2] * maps[-1].shape[3], conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1], conv.out_channels
    a, b = torch.randn(m, k, generator=torch.Generator().manual_seed(0)), torch.randn(k, n, generator=torch.Generator().manual_seed(1))
    name = f"matrix product {m}x{k} @ {k}x{n}"
    calls[name], flops[name] = partial(torch.matmul, a, b), 2 * m * k * n
    if shared:
        first = descriptor.net.trunk.blocks[0][0]
        levels = patch_levels(torch.as_tensor(frames), len(pyramid), descriptor.patch_size)
        first_maps = level_maps(first, pyramid, levels)
        name = f"conv 1 once per level ({len(first_maps)} levels)"
        calls[name] = partial(level_maps, first, pyramid, levels)
        flops[name] = sum(2 * fmap.numel() * first.kernel_size[0] * first.kernel_size[1] for fmap in first_maps.values())
        calls[f"sampling conv 1's {first.out_channels} maps"] = partial(
            first_conv_at_keypoints, first, first_maps, xy, frames, levels, descriptor.patch_size)
    seconds = time_calls(calls, repeats)
    return [(name, 1000 * s, flops[name] / s / 1e9 if name in flops else None) for name, s in seconds.items()]


def _print_split(descriptor: ExemplarDescriptor, image: np.ndarray, keypoints: list[cv2.KeyPoint], repeats: int,
                 shared: bool) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = split_times(descriptor, image, keypoints, repeats, shared)
    finally:
        torch.set_num_threads(threads)
    print(f"{descriptor!r}, {len(keypoints)} keypoints, 1 thread, median of {repeats} runs")
    for stage, ms, rate in rows:
        print(f"{stage:<40s} {ms:>8.1f} ms" + (f" {rate:>6.1f} GFLOP/s" if rate is not None else ""))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns 0, or 2 for a bad option."""
    p = ArgumentParser(prog="python -m benchmarks.cpu_levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="image file, e.g. graf img1.ppm")
    p.add_argument("--num-features", type=int, default=2000, help="SIFT keypoints (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="rounds (default: %(default)s)")
    p.add_argument("--int8", action="store_true", help="also time the int8 convolutions (the model card's calibration)")
    p.add_argument("--qnnpack", action="store_true",
                   help="also run int8 packed for QNNPACK, ARM's engine: ARM's descriptors (not ARM's time)")
    p.add_argument("--onnx", action="store_true", help="also time the model's ONNX file in cv2.dnn (needs the onnx package)")
    p.add_argument("--split", action="store_true", help="instead, time each stage of one compute on one thread")
    p.add_argument("--shared", action="store_true",
                   help="with --split: also time the first convolution once per pyramid level, sampled at the keypoints")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="with --split: the arithmetic of the convolutions (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name or card (default: the shipped default)")
    args = p.parse_args(argv)
    try:
        check_number("num_features", args.num_features, low=1, integer=True)
        check_number("repeats", args.repeats, low=1, integer=True)
        image = cv2.imread(args.image, cv2.IMREAD_GRAYSCALE)
        check(image is not None, "image", args.image, "cannot be read as an image")
        check(args.split or not args.shared, "shared", True, "it times a stage of --split; add --split")
    except ValueError as err:
        return report(err, p)
    keypoints = cv2.SIFT_create(nfeatures=args.num_features).detect(image, None)
    if args.split:
        split = ExemplarDescriptor(args.model, precision=args.precision, batch_size=max(1, len(keypoints)))
        _print_split(split, image, keypoints, args.repeats, args.shared)
        return 0
    sift = cv2.SIFT_create()
    fp32, bf16 = ExemplarDescriptor(args.model, precision="fp32"), ExemplarDescriptor(args.model, precision="bf16")
    nchw = ExemplarDescriptor(args.model, precision="fp32")
    nchw.net.to(memory_format=torch.contiguous_format)
    variants = {"fp32": fp32, "fp32 NCHW": nchw, "bf16": bf16}
    if args.int8:
        variants["int8"] = ExemplarDescriptor(args.model, precision="int8")
    if args.qnnpack:
        arm = ExemplarDescriptor(args.model, precision="fp32")
        arm.net = Int8DescriptorNet(arm.net, arm.card.get("int8"), engine=ENGINES["arm"])
        variants["int8 qnnpack"] = arm
    if args.onnx:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            export_onnx(args.model, path)
            variants["onnx cv2.dnn"] = _DnnVariant(fp32, path)
    reference = fp32.compute(image, keypoints)[1]
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    calls = {(name, t): d for name, d in variants.items() for t in sorted({1, threads})}
    times: dict[object, list[float]] = {key: [] for key in [*calls, "sift"]}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for key in times:
            torch.set_num_threads(threads if key == "sift" else key[1])
            cv2.setNumThreads(cv_threads if key == "sift" else key[1])
            start = time.perf_counter()
            (sift if key == "sift" else calls[key]).compute(image, keypoints)
            if round_:
                times[key].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    cv2.setNumThreads(cv_threads)
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
