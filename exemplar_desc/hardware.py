"""What this machine's CPU computes natively, from torch's probes of its instruction sets.

They decide which arithmetic ``precision="auto"`` takes (:func:`exemplar_desc.descriptor.native_bf16`,
:func:`exemplar_desc.int8.native_int8`) and what ``benchmarks.speed`` reports.
"""

from __future__ import annotations

import platform

import torch

__all__ = ["cpu_family", "cpu_supports"]


def cpu_family() -> str:
    """``"x86"``, ``"arm"`` or ``"other"``: the instruction-set family of this machine's CPU, from ``platform.machine()``."""
    machine = platform.machine().lower()
    if machine in {"x86_64", "amd64", "i386", "i686", "x86"}:
        return "x86"
    return "arm" if machine in {"aarch64", "arm64"} or machine.startswith("arm") else "other"


def cpu_supports(feature: str) -> bool:
    """Whether the CPU has ``feature``, by torch's private probe ``torch.cpu._is_<feature>_supported``.

    Args:
        feature: ``"avx2"``, ``"avx512"``, ``"vnni"`` (AVX512-VNNI), ``"avx512_bf16"`` or ``"amx_tile"``.

    Returns:
        The probe's answer; False where this torch has no such probe.
    """
    return bool(getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)())
