"""Time a descriptor's ``compute`` next to OpenCV SIFT's on the same real keypoints, in one table.

Usage::

    python -m benchmarks.speed                                   # default model, graf img1 and a sceaux_castle photo
    python -m benchmarks.speed --small img.png:1000 --large photo.jpg:8000 --threads 1 --variants fp32
    python -m benchmarks.speed --descriptor rootsift --out runs/speed

Two images: ``--small`` (default: graf img1, 800x640, 2000 keypoints) and ``--large``
(default: a 2832x2128 sceaux_castle photo, 8000 keypoints). Each gets SIFT's own keypoints
(``cv2.SIFT_create(nfeatures=COUNT)``), so the counts are what SIFT finds in a real photo.
For every image and every ``--threads`` count (torch's and OpenCV's threads both), SIFT's
``compute`` and every precision variant of the descriptor (fp32, bf16, int8: the
convolutions quantised with the ranges calibrated in the model card, :mod:`exemplar_desc.int8`)
describe the same keypoints: one warm-up call each, then ``--repeats`` rounds that
alternate all calls, so background load hits them alike; reported are the median times,
descriptors per second and the ratio to SIFT's median. A variant this machine cannot run
is listed as skipped, with the reason. The CPU's name and its bfloat16 hardware are printed
above the table; ``--out DIR`` writes everything to ``DIR/results.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from exemplar_desc.atomic import atomic_write
from exemplar_desc.cli import ArgumentParser, add_shared_options, report
from exemplar_desc.checks import OptionError, check, check_device, check_number, check_output_dir
from exemplar_desc.descriptor import native_bf16
from exemplar_desc.hardware import cpu_supports
from exemplar_desc.int8 import INT8_CPUS, int8_available
from exemplar_desc.registry import is_exemplar

from .descriptors import build_descriptors, catalogue

__all__ = ["time_calls", "cpu_info", "main"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SMALL = f"{SHARED_DATA / 'oxford' / 'graf' / 'img1.ppm'}:2000"
DEFAULT_LARGE = f"{SHARED_DATA / 'sfm' / 'sceaux_castle' / '100_7100.JPG'}:8000"
VARIANTS = ("fp32", "bf16", "int8")


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


def cpu_info() -> dict[str, object]:
    """The CPU's name (``/proc/cpuinfo``'s model name, else ``platform.processor()``), the instruction
    sets that decide the int8 and bf16 variants, and the kernels torch dispatches to (``ATEN_CPU_CAPABILITY``
    can hold them below the CPU's)."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = {key: cpu_supports(key) for key in ("avx2", "avx512", "vnni", "avx512_bf16")}
    return {"name": name or platform.processor() or "unknown", **flags, "amx": cpu_supports("amx_tile"),
            "torch_kernels": torch.backends.cpu.get_cpu_capability(), "logical_cores": torch.multiprocessing.cpu_count()}


def _image_option(dest: str, text: str) -> tuple[str, np.ndarray, int]:
    """``IMAGE:COUNT`` as (path, grey image, count); OptionError naming ``dest`` otherwise."""
    path, sep, count = text.rpartition(":")
    check(bool(sep) and bool(path) and count.isdigit() and int(count) >= 1, dest, text,
          "must be IMAGE:COUNT with a whole number of keypoints >= 1, e.g. img1.ppm:2000")
    check(Path(path).is_file(), dest, text, "no such image file" + (
        f" (the default lies in the shared data folder {SHARED_DATA}; give another image)" if Path(path).is_relative_to(SHARED_DATA) else ""))
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    check(image is not None, dest, text, "cannot be read as an image")
    return path, image, int(count)


def _parse_list(dest: str, text: str, allowed: str, parse: Callable[[str], object]) -> list:
    try:
        values = [parse(item) for item in text.split(",")]
    except ValueError:
        raise OptionError(dest, text, allowed) from None
    check(len(values) == len(set(values)), dest, text, "lists a value twice")
    return values


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--descriptor", help="descriptor name (default: the default shipped model); see "
                   "python -m benchmarks.matching --list")
    p.add_argument("--small", default=DEFAULT_SMALL, metavar="IMAGE:COUNT",
                   help="small image and its SIFT keypoints (default: graf img1.ppm:2000 of ../shared/data)")
    p.add_argument("--large", default=DEFAULT_LARGE, metavar="IMAGE:COUNT",
                   help="full-size photo and its SIFT keypoints (default: sceaux_castle 100_7100.JPG:8000 of ../shared/data)")
    p.add_argument("--threads", default="1,2", help="torch and OpenCV thread counts to time (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="precision variants of an Exemplar descriptor "
                   "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up (default: %(default)s)")
    add_shared_options(p, "--device")
    p.add_argument("--batch-size", type=int, default=None, help="Exemplar patches per network batch (default: 1024, 8192 on CUDA)")
    p.add_argument("--out", help="folder to write results.json into")
    return p


def _check_args(args) -> tuple[list, list[int], list[str], torch.device]:
    """Images, thread counts, variants and device; OptionError naming the first bad option's destination."""
    threads = _parse_list("threads", args.threads, "must be comma-separated whole numbers, e.g. 1,2", int)
    for t in threads:
        check_number("threads", t, low=1, integer=True)
    variants = _parse_list("variants", args.variants, f"must be comma-separated names of {', '.join(VARIANTS)}", str)
    check(all(v in VARIANTS for v in variants), "variants", args.variants, f"must be comma-separated names of {', '.join(VARIANTS)}")
    check_number("repeats", args.repeats, low=1, integer=True)
    if args.batch_size is not None:
        check_number("batch_size", args.batch_size, low=1, integer=True)
    device = check_device("device", args.device)
    if args.out is not None:
        check_output_dir("out", args.out)
    images = [("small", *_image_option("small", args.small)), ("large", *_image_option("large", args.large))]
    return images, threads, variants, device


def _default_descriptor() -> tuple[str, str | None]:
    names, unavailable = catalogue()
    exemplar = [n for n in names if n.startswith("exemplar") and n not in unavailable]
    if exemplar:
        return exemplar[0], None
    return "kornia:sift", f"no shipped Exemplar model ({unavailable.get('exemplar')}); timing kornia:sift instead"


def _variants(name: str, wanted: list[str], device: torch.device, batch_size: int) -> tuple[dict, dict[str, str]]:
    """``({variant: descriptor}, {variant: reason skipped})``; a non-Exemplar descriptor has the one variant ``-``."""
    if not is_exemplar(name):
        built, skipped = build_descriptors([name], device=str(device))
        return ({"-": built[name]}, {}) if name in built else ({}, {"-": skipped[name]})
    built, skipped = {}, {}
    for variant in wanted:
        if variant == "bf16" and not native_bf16(device):
            skipped[variant] = ("no bfloat16 hardware (AVX512-BF16 or AMX) on this CPU" if device.type == "cpu" else
                                "no bfloat16 hardware on this GPU (compute capability 8.0+)") + "; emulated bf16 is slower than fp32"
            continue
        if variant == "int8" and not int8_available(device):
            skipped[variant] = f"int8 needs {INT8_CPUS} and torch's quantised engine for it"
            continue
        made, reasons = build_descriptors([name], device=str(device), precision=variant, batch_size=batch_size)
        if name in made:
            built[variant] = made[name]
        else:
            skipped[variant] = reasons[name]
    return built, skipped


def _fmt(row: dict) -> str:
    head = f"{row['image']:<6s} {row['size']:>9s} {row['keypoints']:>9d} {row['threads']:>7d} {row['variant']:<6s}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    return f"{head} {row['ms']:>10.1f} {row['desc_per_s']:>9.0f} {row['x_sift']:>6.2f}x"


def _run(images: list, threads: list[int], built: dict, skipped: dict[str, str], repeats: int) -> list[dict]:
    """Table rows: per image and thread count, SIFT's reference, then every variant (timed, or skipped)."""
    rows = []
    sift, saved = cv2.SIFT_create(), (torch.get_num_threads(), cv2.getNumThreads())
    try:
        found = [cv2.SIFT_create(nfeatures=count).detect(image, None) for _, _, image, count in images]
        for (_, path, _, _), kps in zip(images, found):
            if not kps:
                raise ValueError(f"SIFT finds no keypoint in {path}")
        for (label, path, image, _), kps in zip(images, found):
            base = {"image": label, "path": path, "size": f"{image.shape[1]}x{image.shape[0]}", "keypoints": len(kps)}
            for t in threads:
                torch.set_num_threads(t)
                cv2.setNumThreads(t)
                calls = {"SIFT": lambda: sift.compute(image, kps)}
                calls.update({v: (lambda d=d: d.compute(image, kps)) for v, d in built.items()})
                times = time_calls(calls, repeats)
                for variant in ["SIFT", *sorted([*built, *skipped], key=(*VARIANTS, "-").index)]:
                    row = {**base, "threads": t, "variant": variant}
                    if variant in skipped:
                        row["skipped"] = skipped[variant]
                    else:
                        s = times[variant]
                        row.update(ms=1000 * s, desc_per_s=len(kps) / s, x_sift=s / times["SIFT"])
                    rows.append(row)
                    print(_fmt(row), flush=True)
    finally:
        torch.set_num_threads(saved[0])
        cv2.setNumThreads(saved[1])
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 1 descriptor unavailable, 2 bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        images, threads, variants, device = _check_args(args)
        name, note = (args.descriptor, None) if args.descriptor else _default_descriptor()
        batch_size = args.batch_size or (8192 if device.type == "cuda" else 1024)
        built, skipped = _variants(name, variants, device, batch_size)
    except ValueError as err:
        return report(err, parser)
    if not built:
        print(f"error: {name} unavailable: {'; '.join(f'{v}: {r}' for v, r in skipped.items())}", file=sys.stderr)
        return 1
    if note:
        print(note)
    cpu = cpu_info()
    flags = {"AVX2": "avx2", "AVX512": "avx512", "AVX512-VNNI": "vnni", "AVX512-BF16": "avx512_bf16", "AMX": "amx"}
    print(f"CPU {cpu['name']} ({cpu['logical_cores']} logical cores); "
          + ", ".join(f"{flag} {'yes' if cpu[key] else 'no'}" for flag, key in flags.items())
          + f"; torch kernels {cpu['torch_kernels']}")
    print(f"{name} on {device}" + (f", batch {batch_size}" if is_exemplar(name) else "")
          + f"; median of {args.repeats} rounds after a warm-up; x SIFT = time / SIFT's time, same image and threads")
    print(f"{'image':<6s} {'size':>9s} {'keypoints':>9s} {'threads':>7s} {'variant':<6s} {'median ms':>10s} {'desc/s':>9s} {'x SIFT':>7s}")
    try:
        rows = _run(images, threads, built, skipped, args.repeats)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.out is not None:
        result = {"descriptor": name, "device": str(device), "batch_size": batch_size, "repeats": args.repeats, "cpu": cpu,
                  "torch": torch.__version__, "opencv": cv2.__version__, "rows": rows}
        path = Path(args.out) / "results.json"
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
