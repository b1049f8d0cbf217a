import pytest
import torch

from exemplar_desc.networks import (
    ARCHITECTURES,
    DescriptorHead,
    DescriptorNet,
    ExemplarClassifier,
    count_flops,
    parse_architecture,
    resolve_architecture,
)


def test_parse_main_net():
    arch = parse_architecture("64c5-128c5-256c5-512f")
    assert arch.convs == ((64, 5, 1), (128, 5, 1), (256, 5, 1))
    assert arch.fcs == (512,)
    assert arch.pool_after == 2 and not arch.batch_norm


def test_parse_stride():
    assert parse_architecture("64c7s2-128c5-256c5-512f").convs[0] == (64, 7, 2)


@pytest.mark.parametrize("bad", ["", "64x5", "64c5-512f-128c5", "512f", "0c5", "64c5--128c5", "64c5-abc"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_architecture(bad)


def test_official_layout_reaches_fc_as_8x8x256():
    model = ExemplarClassifier(ARCHITECTURES["exemplar-nips"], num_classes=10)
    assert model.trunk(torch.zeros(2, 1, 32, 32)).shape == (2, 256, 8, 8)
    pools = [m for m in model.trunk.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 2 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)
    dropouts = [m for m in model.fc.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_named_architecture_builds(name):
    net = DescriptorNet(ARCHITECTURES[name])
    assert net.features(torch.zeros(1, 1, 32, 32)).ndim == 4


def test_resolve_by_name_and_spec():
    assert resolve_architecture("fast").batch_norm
    assert resolve_architecture("64c5-64c5-128f").spec == "64c5-64c5-128f"


def test_fast_net_is_cheap():
    flops = count_flops(DescriptorNet(ARCHITECTURES["fast"]).trunk, (1, 32, 32))
    assert 5e6 < flops < 15e6


def test_head_pca_and_normalisation():
    torch.manual_seed(0)
    head = DescriptorHead(in_channels=8, grid=2, dim=4)
    features = torch.rand(200, 8, 6, 6)
    with pytest.raises(RuntimeError):
        head(features)
    ratio = head.fit(head.pool(features))
    assert ratio.shape == (4,) and torch.all(ratio[:-1] >= ratio[1:])
    # Each ratio is a kept eigenvalue of the covariance over the sum of all of them (its trace).
    cov = torch.cov(head.pool(features).double().T)
    assert torch.allclose(ratio, torch.linalg.eigvalsh(cov).flip(0)[:4] / cov.trace(), rtol=1e-12, atol=0)
    full = DescriptorHead(in_channels=8, grid=2, dim=32)
    assert torch.isclose(full.fit(full.pool(features)).sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    out = head(features)
    assert out.shape == (200, 4)
    assert torch.allclose(out.norm(dim=1), torch.ones(200), atol=1e-5)
    projected = (head.pool(features) - head.mean) @ head.projection
    cov = torch.cov(projected.T)
    assert torch.allclose(cov - torch.diag(torch.diag(cov)), torch.zeros(4, 4), atol=1e-4)  # decorrelated


def test_head_power_and_partial_whitening():
    torch.manual_seed(0)
    features = torch.rand(500, 8, 6, 6) ** 3
    plain = DescriptorHead(in_channels=8, grid=2, dim=4)
    plain.fit(plain.pool(features))
    rooted = DescriptorHead(in_channels=8, grid=2, dim=4, power=0.5)
    rooted.fit(rooted.pool(features))
    # power 0.5 is plain PCA on square-rooted pooled features
    expected = DescriptorHead(in_channels=8, grid=2, dim=4)
    expected.fit(expected.pool(features).sqrt())
    assert torch.allclose(rooted.mean, expected.mean) and torch.allclose(rooted.projection, expected.projection, atol=1e-5)
    assert not torch.allclose(rooted(features), plain(features), atol=1e-2)
    # whitening exponent w: component variances become eigenvalue ** (1 - w); 1 is full whitening
    variances = {}
    for w in (0.0, 0.5, 1.0):
        head = DescriptorHead(in_channels=8, grid=2, dim=4)
        head.fit(head.pool(features), whiten=w)
        variances[w] = torch.var((head.pool(features) - head.mean) @ head.projection, dim=0)
    assert torch.allclose(variances[1.0], torch.ones(4), atol=1e-3)
    assert torch.allclose(variances[0.5], variances[0.0].sqrt(), rtol=1e-3)
    with pytest.raises(ValueError, match="whitening"):
        plain.fit(plain.pool(features), whiten=2.0)
    with pytest.raises(ValueError, match="power"):
        DescriptorHead(in_channels=8, grid=2, dim=4, power=0.0)


@pytest.mark.parametrize("grid, side, power, pooling",
                         [(4, 8, 0.5, "max"), (4, 4, 0.5, "max"), (2, 6, 1.0, "max"), (4, 8, 0.5, "avg"), (2, 6, 1.0, "avg")])
def test_the_heads_path_for_nonnegative_features_is_the_same_map(grid, side, power, pooling):
    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(64, 16, side, side, generator=g))
    head = DescriptorHead(in_channels=16, grid=grid, dim=8, power=power, pooling=pooling)
    head.fit(head.pool(features), whiten=0.5)
    # Float64 reference of the map; both float32 paths round K-term dot products of
    # (x - m) and the projection, each within K u sum|terms| (u = 2^-24), and a unit vector
    # r / |r| moves by at most |dr| / |r| per element (first order), plus a few u of its own.
    # A float32 mean of a cell's c values is within (c + 1) u of its own value (c - 1 sums
    # and a division), and the power p <= 1 does not raise a relative error: c + 1 more terms.
    pooled = head._compress(head.pool(features.double()))
    projection, mean = head.projection.double(), head.mean.double()
    raw = (pooled - mean) @ projection
    terms = (pooled.abs() + mean.abs()) @ projection.abs()
    cell = (side // grid) ** 2 + 1 if pooling == "avg" else 0
    k, u = pooled.shape[1] + 2 + cell, 2.0**-24
    bound = (k * u * terms).norm(dim=1, keepdim=True) / raw.norm(dim=1, keepdim=True) + 4 * u
    reference = raw / raw.norm(dim=1, keepdim=True)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = features.contiguous(memory_format=memory_format)
        kept = x.clone()
        for out in (head(x), head(x, nonnegative=True)):
            assert ((out.double() - reference).abs() <= bound).all(), memory_format
        assert torch.equal(x, kept)  # the power compresses its own copy, never the caller's map


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bfloat16_features_give_the_descriptors_of_their_float32_values(memory_format):
    """The head pools bfloat16 maps before casting them: a maximum of bfloat16 values is exact, so nothing moves."""
    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(64, 16, 8, 8, generator=g)).to(torch.bfloat16).contiguous(memory_format=memory_format)
    head = DescriptorHead(in_channels=16, grid=4, dim=8, power=0.5)
    head.fit(head.pool(features.float()), whiten=0.5)
    for nonnegative in (False, True):
        out = head(features, nonnegative=nonnegative)
        assert out.dtype == torch.float32
        assert torch.equal(out, head(features.float().contiguous(memory_format=memory_format), nonnegative=nonnegative))


def test_head_dimension_is_a_parameter():
    with pytest.raises(ValueError):
        DescriptorHead(in_channels=2, grid=2, dim=9)
    with pytest.raises(ValueError, match="pooling must be one of"):
        DescriptorHead(in_channels=2, grid=2, dim=4, pooling="median")
    assert DescriptorNet(ARCHITECTURES["fast"], dim=64).head.projection.shape == (128 * 16, 64)


def test_batch_norm_fusion_keeps_the_output():
    torch.manual_seed(0)
    net = DescriptorNet(ARCHITECTURES["fast"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(8, 1, 32, 32)
    net.head.fit(net.head.pool(net.features(torch.randn(300, 1, 32, 32))))
    before = net(x)
    fused = net.fuse_batch_norm()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert torch.allclose(fused(x), before, atol=1e-5)
