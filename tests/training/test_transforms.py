import math

import pytest
import torch

from exemplar_desc.training.transforms import (
    FAMILIES,
    SurrogateSampler,
    TransformConfig,
    blur,
    colour_pca_basis,
    hsv_jitter,
    pca_colour,
    sample_parameters,
    to_gray,
    warp,
)


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(6, 3, 32, 32)


def test_identity_parameters_give_identity(images):
    context = torch.rand(4, 3, 80, 80)
    crop = context[:, :, 24:56, 24:56]
    out = warp(context, torch.zeros(4, 2), torch.ones(4), torch.zeros(4), 32)
    assert torch.allclose(out, crop, atol=1e-5)
    mean, basis = colour_pca_basis(images.permute(0, 2, 3, 1).reshape(-1, 3))
    assert torch.allclose(pca_colour(images, torch.ones(6, 3), mean, basis), images, atol=1e-5)
    ones, zeros = torch.ones(6, 2), torch.zeros(6, 2)
    assert torch.allclose(hsv_jitter(images, ones, ones, zeros, torch.zeros(6)), images, atol=1e-4)
    assert torch.allclose(blur(images, torch.zeros(6), 1.5), images, atol=1e-5)


def test_warp_geometry():
    context = torch.rand(1, 1, 80, 80)
    crop = context[:, :, 24:56, 24:56]
    turned = warp(context, torch.zeros(1, 2), torch.ones(1), torch.full((1,), 90.0), 32)
    assert torch.allclose(turned, torch.rot90(crop, 1, (2, 3)), atol=1e-5)  # frame clockwise = content anticlockwise
    shifted = warp(context, torch.tensor([[0.25, 0.0]]), torch.ones(1), torch.zeros(1), 32)
    assert torch.allclose(shifted, context[:, :, 24:56, 32:64], atol=1e-5)  # 0.25 x 32 px to the right
    zoomed = warp(context, torch.zeros(1, 2), torch.full((1,), 2.0), torch.zeros(1), 32)
    assert torch.allclose(zoomed[0, 0, 0, 0], context[0, 0, 8:10, 8:10].mean(), atol=1e-5)  # covers 64 px


def test_pca_colour_with_unit_factors_preserves_the_mean(images):
    mean, basis = colour_pca_basis(images.permute(0, 2, 3, 1).reshape(-1, 3))
    out = pca_colour(images, torch.ones(6, 3), mean, basis)
    assert torch.allclose(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-5)
    changed = pca_colour(images, torch.full((6, 3), 1.8), mean, basis)
    assert (changed - images).abs().max() > 0.05


def test_colour_basis_is_orthonormal(images):
    _, basis = colour_pca_basis(images.permute(0, 2, 3, 1).reshape(-1, 3))
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)


def test_blur_smooths_and_keeps_the_mean(images):
    out = blur(images, torch.full((6,), 1.5), 1.5)
    assert out.std() < 0.6 * images.std()
    assert torch.allclose(out.mean(), images.mean(), atol=0.01)


def test_hue_shift_by_a_full_turn_is_identity(images):
    ones, zeros = torch.ones(6, 2), torch.zeros(6, 2)
    assert torch.allclose(hsv_jitter(images, ones, ones, zeros, torch.ones(6)), images, atol=1e-4)


def test_parameter_ranges_hold():
    cfg = TransformConfig()
    gen = torch.Generator().manual_seed(0)
    p = sample_parameters(20000, cfg, gen)
    assert p["shift"].abs().max() <= cfg.translation and p["shift"].abs().max() > 0.95 * cfg.translation
    assert cfg.scale[0] <= p["scale"].min() and p["scale"].max() <= cfg.scale[1]
    assert p["angle"].abs().max() <= cfg.rotation and p["angle"].abs().max() > 0.95 * cfg.rotation
    assert 1 / cfg.pca_colour <= p["pca"].min() and p["pca"].max() <= cfg.pca_colour
    assert 1 / cfg.hsv_power <= p["power"].min() and p["power"].max() <= cfg.hsv_power
    assert abs(float(p["power"].log().mean())) < 0.05  # log-uniform: as many exponents below 1 as above
    assert cfg.hsv_multiply[0] <= p["multiply"].min() and p["multiply"].max() <= cfg.hsv_multiply[1]
    assert p["add"].abs().max() <= cfg.hsv_add
    assert p["hue"].abs().max() <= cfg.hue
    assert 0 <= p["sigma"].min() and p["sigma"].max() <= cfg.blur


def test_scaled_ranges_follow_the_config():
    cfg = TransformConfig(rotation=5.0, translation=0.05)
    p = sample_parameters(5000, cfg, torch.Generator().manual_seed(1))
    assert p["angle"].abs().max() <= 5.0 and p["shift"].abs().max() <= 0.05


def test_without_switches_families_off():
    cfg = TransformConfig().without(*FAMILIES)
    p = sample_parameters(100, cfg, torch.Generator().manual_seed(0))
    assert torch.all(p["shift"] == 0) and torch.all(p["scale"] == 1) and torch.all(p["angle"] == 0)
    assert torch.all(p["pca"] == 1) and torch.all(p["power"] == 1) and torch.all(p["sigma"] == 0)
    with pytest.raises(ValueError, match="unknown"):
        TransformConfig().without("shear")


def test_sampler_identity_returns_grey_centre_crop():
    contexts = torch.randint(0, 256, (5, 3, 80, 80), dtype=torch.uint8)
    sampler = SurrogateSampler(contexts, TransformConfig().without(*FAMILIES))
    out = sampler.sample(torch.arange(5), torch.Generator().manual_seed(0))
    expected = to_gray(contexts[:, :, 24:56, 24:56].float() / 255)
    assert out.shape == (5, 1, 32, 32)
    assert torch.allclose(out, expected, atol=1e-4)


def test_sampler_is_reproducible_and_random():
    contexts = torch.randint(0, 256, (5, 3, 80, 80), dtype=torch.uint8)
    sampler = SurrogateSampler(contexts, TransformConfig())
    ids = torch.tensor([0, 0, 1])
    a = sampler.sample(ids, torch.Generator().manual_seed(3))
    b = sampler.sample(ids, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # two samples of one class differ
    assert 0 <= a.min() and a.max() <= 1 and math.isfinite(float(a.sum()))


def test_sampler_rejects_bad_contexts():
    with pytest.raises(ValueError, match="uint8"):
        SurrogateSampler(torch.rand(2, 3, 80, 80), TransformConfig())
