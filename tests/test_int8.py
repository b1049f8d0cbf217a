"""int8 inference: calibration record, the quantisation error bound, pooling on the integers, errors."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exemplar_desc import ExemplarDescriptor, int8 as int8_module
from exemplar_desc.hardware import cpu_supports
from exemplar_desc.int8 import ENGINES, INT8_CPUS, Int8DescriptorNet, _pooled, activation_max, calibrate_int8, int8_available, int8_engine
from exemplar_desc.networks import DescriptorNet, parse_architecture
from exemplar_desc.patches import normalize_patches

pytestmark = pytest.mark.skipif(not int8_available(), reason=f"int8 needs {INT8_CPUS}")

#: The CPU families whose int8 engine runs here. QNNPACK (ARM's) is portable: x86 builds of torch
#: carry it, so its arithmetic is tested on x86 machines too.
_FAMILIES = [family for family in ENGINES if int8_engine(family)]


@pytest.fixture(params=_FAMILIES)
def family(request, monkeypatch) -> str:
    """Each CPU family's int8 engine in turn, as :func:`exemplar_desc.int8.int8_engine` picks it on such a CPU."""
    monkeypatch.setattr(int8_module, "cpu_family", lambda: request.param)
    return request.param


def _patches(count: int, seed: int) -> torch.Tensor:
    return normalize_patches(torch.rand(count, 1, 32, 32, generator=torch.Generator().manual_seed(seed)))


def _one_conv_net(pooling: str = "max") -> DescriptorNet:
    """A fitted descriptor network of one 4x4 stride-2 convolution (16 x 16 maps, pooled 4 x 4)."""
    torch.manual_seed(0)
    net = DescriptorNet(parse_architecture("8c4s2", pool_after=0), grid=4, dim=16, pooling=pooling).eval()
    with torch.no_grad():
        net.head.fit(net.head.pool(net.features(_patches(256, 1))))
    return net


def test_calibration_records_one_range_per_activation():
    net = _one_conv_net()
    record = calibrate_int8(net, [_patches(100, 2), _patches(60, 3)])
    (in_low, in_high), (out_low, out_high), (root_low, root_high), (desc_low, desc_high) = record["activation_ranges"]
    assert record["patches"] == 160
    assert in_low < 0 < in_high  # standardised patches
    assert out_low == 0 < out_high  # after the ReLU
    assert root_low == 0 < root_high  # the head's square root of the pooled features
    assert desc_low < 0 < desc_high  # the centred projection
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate_int8(net, [])


def _step_edges(count: int) -> torch.Tensor:
    """Standardised vertical step edges: the bright half sits at the top of the input's range."""
    patches = torch.zeros(count, 1, 32, 32)
    for i, column in enumerate(torch.linspace(8, 24, count).round().long()):
        patches[i, :, :, column:] = 1.0
    return normalize_patches(patches)


@pytest.mark.parametrize("weights", ["random", "positive"])
def test_int8_convolution_stays_within_its_rounding_bound(weights, family):
    check_rounding_bound(weights)


def check_rounding_bound(weights: str) -> None:
    """|int8 - float| per output <= sum_i |w_i| s_x / 2 + |x_i| s_w / 2 (+ their product) + s_x s_w / 2 + s_y / 2:
    input, weight, bias and output rounding, no clipping (the ranges cover the activations).

    With equal positive weights on a step edge, neighbouring products reach 255 x 127 each: a
    kernel that sums them in pairs in 16 bits (oneDNN's AVX512 and FBGEMM's without VNNI) saturates
    and breaks the bound, unless the activations keep to 7 bits (activation_max).
    """
    net = _one_conv_net()
    x = _patches(64, 4)
    if weights == "positive":
        with torch.no_grad():
            net.trunk.blocks[0][0].weight.fill_(0.1)
        x = _step_edges(64)
    with torch.no_grad():
        y = net.features(x)
    conv = net.trunk.blocks[0][0]
    ranges = [[float(x.min()), float(x.max())], [0.0, float(y.max())]]
    head_ranges = calibrate_int8(net, [x])["activation_ranges"][2:]
    int8 = Int8DescriptorNet(net, {"activation_ranges": ranges + head_ranges})
    got = int8.trunk(x).dequantize()
    codes = activation_max()
    s_x, s_y = (ranges[0][1] - ranges[0][0]) / codes, ranges[1][1] / codes
    s_w = dict(int8.trunk.named_modules())["0"].weight().q_per_channel_scales().float().view(1, -1, 1, 1)
    w_abs = conv.weight.detach().abs()
    x_abs = x.abs() + s_x / 2
    bound = (F.conv2d(torch.full_like(x, s_x / 2), w_abs, stride=2, padding=1)
             + F.conv2d(x_abs, torch.ones_like(w_abs), stride=2, padding=1) * s_w / 2
             + s_x * s_w / 2 + s_y / 2)
    error = (got - y).abs()
    assert float(error.max()) > 0  # the integers differ from the floats
    assert bool((error <= bound * (1 + 1e-5) + 1e-6).all())


#: Per CPU without VNNI that int8 runs on: the libraries' variables that hold their kernels to it, and
#: the probe answer that gives its activation codes (activation_max).
_KERNELS_WITHOUT_VNNI = {
    "avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, ""),
    "avx512": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "torch.cpu._is_vnni_supported = lambda: False; "),
}


@pytest.mark.parametrize("isa", sorted(_KERNELS_WITHOUT_VNNI))
def test_int8_convolution_keeps_its_bound_with_the_kernels_of_cpus_without_vnni(isa):
    """The bound tests again in a process whose kernels are those of an x86 CPU without VNNI, where
    int8 runs too: AVX2 alone (8-bit activations) and AVX512 (7-bit ones)."""
    if not cpu_supports(isa):
        pytest.skip(f"this CPU has no {isa}")
    variables, probe = _KERNELS_WITHOUT_VNNI[isa]
    code = (f"import torch; {probe}import tests.test_int8 as t; from exemplar_desc.int8 import activation_max; "
            "[t.check_rounding_bound(w) for w in ('random', 'positive')]; "
            "print('codes', activation_max())")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **variables}, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == ("127" if isa == "avx512" else "255")


@pytest.mark.parametrize("side", [16, 10])
def test_pooling_on_the_integers_equals_pooling_the_floats(side):
    """16 x 16 maps pool 4 x 4 on the integers, 10 x 10 ones (no whole cells) after dequantising: the same maxima."""
    g = torch.Generator().manual_seed(6)
    features = torch.quantize_per_tensor(torch.rand(8, 5, side, side, generator=g), 0.01, 0, torch.quint8)
    expected = F.adaptive_max_pool2d(features.dequantize(), 4).permute(0, 2, 3, 1).reshape(8, -1)
    assert torch.equal(_pooled(features, 4), expected)
    assert torch.equal(_pooled(features.dequantize(), 4), expected)


@pytest.mark.parametrize("side", [16, 10])
def test_average_pooling_on_the_integers_is_within_half_a_code(side):
    """A mean of whole cells is rounded to the map's codes (scale 0.01): within half a code of the floats' mean,
    plus float32 rounding; without whole cells the floats are pooled, the same computation as on the floats."""
    g = torch.Generator().manual_seed(6)
    features = torch.quantize_per_tensor(torch.rand(8, 5, side, side, generator=g), 0.01, 0, torch.quint8)
    expected = F.adaptive_avg_pool2d(features.dequantize(), 4).permute(0, 2, 3, 1).reshape(8, -1)
    assert torch.equal(_pooled(features.dequantize(), 4, "avg"), expected)
    error = (_pooled(features, 4, "avg") - expected).abs().max()
    assert error <= (0.005 + 1e-6 if side % 4 == 0 else 0)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_int8_descriptors_are_unit_vectors_near_float32s(pooling, family):
    net = _one_conv_net(pooling)
    int8 = Int8DescriptorNet(net, calibrate_int8(net, [_patches(256, 5)]))
    x = _patches(64, 7)
    with torch.no_grad():
        got, reference = int8(x), net(x)
    assert got.shape == reference.shape == (64, 16) and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=1), torch.ones(len(got)), atol=1e-5)
    assert float((got * reference).sum(1).min()) > 0.9  # far from chance (a random 16-D pair: |cos| ~ 0.25)


def test_int8_needs_the_cards_calibration(random_model):
    net = _one_conv_net()
    with pytest.raises(ValueError, match=r"card\['int8'\]"):
        Int8DescriptorNet(net, None)
    with pytest.raises(ValueError, match="has 1 ranges, the network needs 4"):
        Int8DescriptorNet(net, {"activation_ranges": [[0.0, 1.0]]})
    with pytest.raises(ValueError, match="engine must be one of onednn, qnnpack or None, got 'fbgemm'"):
        Int8DescriptorNet(net, calibrate_int8(net, [_patches(8, 2)]), engine="fbgemm")
    with pytest.raises(ValueError, match="precision 'int8': needs an x86 CPU with AVX2 or an ARM CPU"):
        ExemplarDescriptor(random_model, device="meta", precision="int8")


def test_shipped_default_runs_in_int8(photo_bgr, family):
    """The default's card carries its calibration; int8 descriptors are unit vectors near float32's."""
    keypoints = cv2.SIFT_create(nfeatures=300).detect(photo_bgr, None)
    fp32 = ExemplarDescriptor(precision="fp32").compute(photo_bgr, keypoints)[1]
    int8 = ExemplarDescriptor(precision="int8")
    assert "precision='int8'" in repr(int8)
    out = int8.compute(photo_bgr, keypoints)[1]
    assert out.dtype == np.float32 and out.shape == fp32.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Each keypoint's nearest float32 descriptor is its own (or an identical one): int8 keeps what matching uses.
    similarity = out @ fp32.T
    assert np.all(similarity.diagonal() >= similarity.max(axis=1) - 1e-6)
