"""int8 inference of the descriptor network on x86 and ARM CPUs: static quantisation.

The convolutions (each fused with its ReLU) and the head's projection run on 8-bit integers
through PyTorch's oneDNN quantised engine on x86 CPUs with AVX2, and through QNNPACK on ARM
(:func:`int8_engine`): weights symmetric int8 per output channel; activations unsigned 8-bit
per tensor over their full range, or 7-bit on AVX512 CPUs without VNNI (:func:`activation_max`). The ranges of the
activations (the trunk's input and each convolution's output, the projection's input and
output) are calibrated once, on patches at SIFT keypoints of the
training photos, by the training command, which records them in the model card
(``card["int8"]``); loading builds the quantised network from them, so the descriptors of
every image share one scale. The head pools the trunk's integers (a maximum commutes
with the positive scaling, so max-pooling is exact; a mean is rounded to the nearest code);
its power and the final normalisation run in float32.

Example::

    descriptor = ExemplarDescriptor(precision="int8")  # the default model's card holds the ranges
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .hardware import cpu_family, cpu_supports
from .networks import FIXED_POOLINGS, POOLINGS, DescriptorNet, compress_nonnegative

__all__ = ["int8_engine", "int8_available", "native_int8", "activation_max", "calibrate_int8", "Int8DescriptorNet"]

#: PyTorch's quantised engine the int8 path runs on, per CPU family (:func:`int8_engine`). On x86
#: not "x86": that engine hands the convolutions to FBGEMM on CPUs without AVX512-VNNI and on every
#: OS but Linux, and FBGEMM's AVX2 and AVX512 kernels saturate the cards' full-range activations (the
#: default's min cosine on graf 0.965 on AVX2). On ARM QNNPACK, the engine of PyTorch's ARM builds.
ENGINES = {"x86": "onednn", "arm": "qnnpack"}
#: The CPUs :func:`int8_available` accepts, for messages.
INT8_CPUS = "an x86 CPU with AVX2 or an ARM CPU"
_QMIN, _QMAX = 0, 255  # unsigned 8-bit activations over their full range: the calibration's codes


def int8_engine(family: str | None = None) -> str | None:
    """PyTorch's quantised engine that runs the int8 network on a CPU of ``family`` (default: this
    machine's, :func:`~exemplar_desc.hardware.cpu_family`; :data:`ENGINES`): ``"onednn"`` on an x86 CPU
    with AVX2, ``"qnnpack"`` on ARM; None on other CPUs, or where this torch was built without the engine."""
    family = family or cpu_family()
    engine = ENGINES.get(family) if family != "x86" or cpu_supports("avx2") else None
    return engine if engine in torch.backends.quantized.supported_engines else None


def int8_available(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs the int8 network: a CPU with an engine of :func:`int8_engine`
    (oneDNN with AVX512-VNNI, AVX512 without VNNI or AVX2 alone on x86; QNNPACK on ARM)."""
    return torch.device(device).type == "cpu" and int8_engine() is not None


def activation_max(engine: str | None = None) -> int:
    """The largest activation code of the int8 network on this CPU (``engine``: the quantised engine it
    runs on, default :func:`int8_engine`): 255, or 127 for oneDNN on AVX512 CPUs without VNNI.

    Without VNNI, oneDNN's AVX512 kernels sum two products of 8-bit activations and weights
    in 16 bits, which 255 x 127 x 2 overflows and 127 x 127 x 2 does not (the default model's
    min cosine to float32 on graf: 0.959 with 8-bit activations, 0.992 with 7-bit ones). Its
    AVX2 kernels and its VNNI ones keep 8 bits (0.996), as QNNPACK does, which widens each code to 16 bits
    and sums the products in 32. The card's ranges serve both: 7 bits spread the same range over half the codes.
    """
    if (engine or int8_engine()) == ENGINES["arm"]:
        return _QMAX
    return _QMAX if cpu_supports("vnni") or not cpu_supports("avx512") else _QMAX // 2


def native_int8(device: str | torch.device) -> bool:
    """Whether ``precision="auto"`` takes int8 on ``device``: an x86 CPU where :func:`int8_available`
    holds. There it is the fastest arithmetic that keeps the benchmark results (docs/throughput.md).
    On ARM int8 runs when asked for, but ``auto`` does not take it: its speed there was not measured."""
    return torch.device(device).type == "cpu" and int8_engine() == ENGINES["x86"]


@contextmanager
def _engine(engine: str) -> Iterator[None]:
    """``engine`` while weights are packed (the packing picks the kernels); the caller's engine is restored afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _float_trunk(net: DescriptorNet) -> nn.Sequential:
    """The trunk as one flat float32 Sequential, batch norms folded, so each convolution meets its ReLU."""
    trunk = copy.deepcopy(net).cpu().fuse_batch_norm().trunk.float().eval()
    return nn.Sequential(*[m for block in trunk.blocks for m in block if not isinstance(m, nn.Identity)])


def _float_projection(net: DescriptorNet) -> nn.Sequential:
    """The head's centring and projection as one float32 Linear on cell-major pooled features (:func:`_pooled`)."""
    head = net.head
    weight = head.cell_major_projection().detach().cpu().float().reshape(-1, head.projection.shape[1])
    linear = nn.Linear(*weight.shape)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        linear.bias.copy_(-(head.mean.detach().cpu().float() @ head.projection.detach().cpu().float()))
    return nn.Sequential(linear).eval()


def _pooled(features: torch.Tensor, grid: int, pooling: str = "max") -> torch.Tensor:
    """(B, F, h, w) feature maps, quantised or float -> (B, grid * grid * F) float features pooled
    by ``pooling`` (:data:`~exemplar_desc.networks.POOLINGS`), cell by cell.

    A quantised map is pooled on its integers where the grid divides it (quantised pooling has
    no adaptive form): a maximum commutes with the positive scaling, so max-pooling is exact; a
    mean is rounded to the nearest code, at most half a code, the quantisation's own error.
    """
    if features.is_quantized:
        height, width = features.shape[-2:]
        if height % grid == 0 and width % grid == 0:
            features = FIXED_POOLINGS[pooling](features, (height // grid, width // grid))
        features = features.dequantize()
    if features.shape[-2:] != (grid, grid):
        features = POOLINGS[pooling](features, grid)
    return features.permute(0, 2, 3, 1).reshape(len(features), -1)


def _prepare(module: nn.Sequential, activation_observer: type, example: torch.Tensor,
             quantized_output: bool, quant_max: int) -> torch.fx.GraphModule:
    """``module`` with observers (``activation_observer`` for activations over codes [0, quant_max],
    per-channel symmetric for weights)."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.observer import PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_fx

    qconfig = QConfig(activation=activation_observer.with_args(dtype=torch.quint8, quant_min=_QMIN, quant_max=quant_max),
                      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    custom = PrepareCustomConfig().set_output_quantized_indexes([0] if quantized_output else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that FX quantisation moves to torchao
        return prepare_fx(module, QConfigMapping().set_global(qconfig), (example,), prepare_custom_config=custom)


def _prepared_pair(
    net: DescriptorNet, activation_observer: type, example: torch.Tensor, quant_max: int = _QMAX
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The trunk (quantised output, so the pooling runs on the integers) and the projection (float output), prepared
    with activation codes [0, ``quant_max``]."""
    trunk = _float_trunk(net)
    with torch.no_grad():  # the projection's example input, before any observer sees the trunk
        pooled = compress_nonnegative(_pooled(trunk(example), net.head.grid, net.head.pooling), net.head.power)
    return (_prepare(trunk, activation_observer, example, True, quant_max),
            _prepare(_float_projection(net), activation_observer, pooled, False, quant_max))


def _activation_observers(*prepared: torch.fx.GraphModule) -> list[nn.Module]:
    """The activation observers in graph order: the trunk's input and each fused convolution's
    output, then the projection's input and output."""
    from torch.ao.quantization.observer import ObserverBase

    return [m for module in prepared for node in module.graph.nodes if node.op == "call_module"
            for m in [module.get_submodule(node.target)] if isinstance(m, ObserverBase)]


@torch.inference_mode()
def calibrate_int8(net: DescriptorNet, batches: Iterable[torch.Tensor]) -> dict:
    """Activation ranges of ``net`` for int8 inference, from a histogram of real activations.

    Each range is the one that minimises the quantisation error of its activation
    (PyTorch's ``HistogramObserver``), so rare outliers are clipped rather than coarsening
    every value.

    Args:
        net: descriptor network (eval mode, any device; run here on the CPU in float32).
        batches: (B, 1, P, P) standardised patches, as :func:`exemplar_desc.patches.normalize_patches`
            gives them; patches at keypoints of photos of the model's domain.

    Returns:
        The card's ``int8`` record: ``{"activation_ranges": [[low, high], ...], "patches": N, ...}``,
        one range (in the activation's units) per observed tensor: the trunk's input and each
        convolution's output, then the head projection's input and output.

    Raises:
        ValueError: ``batches`` is empty.
    """
    from torch.ao.quantization.observer import HistogramObserver

    prepared, count = None, 0
    for batch in batches:
        batch = batch.detach().float().cpu()
        if prepared is None:
            prepared = _prepared_pair(net, HistogramObserver, batch[:1])
        trunk, projection = prepared
        projection(compress_nonnegative(_pooled(trunk(batch), net.head.grid, net.head.pooling), net.head.power))
        count += len(batch)
    if prepared is None:
        raise ValueError("batches is empty: int8 calibration needs patches")
    ranges = []
    for observer in _activation_observers(*prepared):
        scale, zero_point = (float(v) for v in observer.calculate_qparams())
        ranges.append([(_QMIN - zero_point) * scale, (_QMAX - zero_point) * scale])
    return {"activation_ranges": ranges, "patches": count, "observer": "histogram, uint8 over the full range",
            "weights": "int8, symmetric per output channel"}


class Int8DescriptorNet(nn.Module):
    """A :class:`DescriptorNet` run in int8 (:func:`int8_available`) with its card's calibration: the
    trunk's convolutions and the head's projection on 8-bit integers (activations over
    :func:`activation_max` codes), the pooling on the trunk's integers, the power and the
    normalisation in float32.

    Shape:
        - Input: (B, 1, P, P) float standardised patches.
        - Output: (B, dim) float32 unit-length descriptors, as ``DescriptorNet``'s.

    Args:
        net: the float network.
        calibration: the card's ``int8`` record (:func:`calibrate_int8`).
        engine: the quantised engine to pack for, a value of :data:`ENGINES` (default: :func:`int8_engine`,
            this CPU's). QNNPACK's kernels are portable: packed for it, an x86 CPU computes ARM's descriptors.

    Raises:
        ValueError: the card holds no int8 calibration, or the number of its ranges does not fit the
            network, or ``engine`` is not a value of :data:`ENGINES`.
        RuntimeError: int8 does not run on this machine (:func:`int8_available`), or this torch lacks ``engine``.
    """

    def __init__(self, net: DescriptorNet, calibration: dict | None, engine: str | None = None) -> None:
        super().__init__()
        if engine is not None and engine not in ENGINES.values():
            raise ValueError(f"engine must be one of {', '.join(ENGINES.values())} or None, got {engine!r}")
        engine = engine or int8_engine()
        if engine not in torch.backends.quantized.supported_engines:
            raise RuntimeError(f"int8 needs {INT8_CPUS} and PyTorch's quantised engine for it ({ENGINES}) "
                               f"(engines here: {', '.join(torch.backends.quantized.supported_engines)}); "
                               "use precision='fp32' or 'auto'")
        if not calibration or "activation_ranges" not in calibration:
            raise ValueError("the model card holds no int8 calibration (card['int8']), which the training command "
                             "writes with every model; use precision 'auto', 'fp32' or 'bf16' for this one")
        from torch.ao.quantization.observer import MinMaxObserver
        from torch.ao.quantization.quantize_fx import convert_fx

        prepared = _prepared_pair(net, MinMaxObserver, torch.zeros(1, 1, 32, 32), activation_max(engine))
        observers, ranges = _activation_observers(*prepared), calibration["activation_ranges"]
        if len(ranges) != len(observers):
            raise ValueError(f"the card's int8 calibration has {len(ranges)} ranges, the network needs {len(observers)}")
        for observer, (low, high) in zip(observers, ranges):
            observer.min_val, observer.max_val = torch.tensor(float(low)), torch.tensor(float(high))
        with _engine(engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices of quantised tensors
            self.trunk, self.projection = (convert_fx(module) for module in prepared)
        self.head = net.head  # for its shape and device (exemplar_desc.descriptor.describe_images)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        pooled = _pooled(self.trunk(patches.float()), self.head.grid, self.head.pooling)  # this call's own: compressed in place
        return F.normalize(self.projection(compress_nonnegative(pooled, self.head.power, inplace=True)), dim=1)
