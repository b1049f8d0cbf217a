import math

import pytest
import torch

from exemplar_desc.training.transforms import (
    FAMILIES,
    SurrogateSampler,
    TransformConfig,
    blur,
    colour_pca_basis,
    gamma,
    hsv_jitter,
    noise,
    pca_colour,
    sample_parameters,
    shading,
    shadow,
    to_gray,
    warp,
)

#: The light-change families switched on.
LIGHT = TransformConfig(gamma=2.0, shading=0.7, shadow=0.5, noise=0.05)


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


def test_default_sampler_draws_and_applies_the_paper_families_only():
    # The light families are off by default: same draws and same patches as the paper's
    # pipeline, so earlier commands (and the shipped model's) stay reproducible.
    contexts = torch.randint(0, 256, (5, 3, 80, 80), dtype=torch.uint8)
    sampler = SurrogateSampler(contexts, TransformConfig())
    ids = torch.tensor([0, 1, 2, 3, 4, 0])
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out = sampler.sample(ids, gen_a)
    p = sample_parameters(len(ids), TransformConfig(), gen_b)
    assert set(p) == {"shift", "scale", "angle", "pca", "power", "multiply", "add", "hue", "sigma"}
    x = warp(contexts[ids].float() / 255, p["shift"], p["scale"], p["angle"], 32)
    x = hsv_jitter(pca_colour(x, p["pca"], sampler.colour_mean, sampler.colour_basis), p["power"], p["multiply"], p["add"], p["hue"])
    assert torch.equal(out, blur(to_gray(x), p["sigma"], 1.5))
    assert torch.equal(gen_a.get_state(), gen_b.get_state())  # nothing more was drawn


def test_light_families_at_their_identity_give_identity(images):
    n = len(images)
    assert torch.equal(gamma(images, torch.ones(n)), images)
    assert torch.equal(shading(images, torch.tensor([[0.0, 1.0, 0.5]]).repeat(n, 1)), images)
    assert torch.equal(shadow(images, torch.tensor([[1.0, 1.0, 0.1, 0.1]]).repeat(n, 1)), images)
    assert torch.equal(noise(images, torch.zeros(n, 2), torch.Generator().manual_seed(0)), images)


def test_light_parameter_ranges_hold():
    p = sample_parameters(20000, LIGHT, torch.Generator().manual_seed(0))
    assert 1 / 2.0 <= p["gamma"].min() and p["gamma"].max() <= 2.0 and abs(float(p["gamma"].log().mean())) < 0.02
    assert 0 <= p["shading"][:, 0].min() and p["shading"][:, 0].max() <= 0.7 and p["shading"][:, 2].abs().max() <= 1
    factor = p["shadow"][:, 0]
    shadowed = factor < 1
    assert abs(float(shadowed.float().mean()) - 0.5) < 0.02
    assert 0.3 <= factor[shadowed].min() and factor[shadowed].max() <= 0.8
    assert 0 <= p["noise"].min() and p["noise"].max() <= 0.05


def test_gamma_is_a_power_on_every_channel(images):
    assert torch.allclose(gamma(images, torch.full((6,), 2.0)), images**2, atol=1e-6)


def test_shading_is_a_log_gradient_of_the_given_range_and_direction():
    flat = torch.full((3, 3, 32, 32), 0.5)
    gains = torch.tensor([0.7, 0.3, 0.5])
    directions = torch.tensor([0.0, math.pi / 2, math.pi / 4])
    out = shading(flat, torch.stack([gains, directions, torch.zeros(3)], dim=1))
    log_gain = (out / flat).log()[:, 0]
    assert torch.allclose(log_gain.amax(dim=(1, 2)) - log_gain.amin(dim=(1, 2)), gains, atol=1e-5)
    assert torch.allclose(log_gain.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5)  # centred: no global gain
    # A plane: constant across the direction, linear along it.
    assert torch.allclose(log_gain[0], log_gain[0, :1].expand(32, 32), atol=1e-6)  # d = 0: rises with x
    assert torch.all(log_gain[0, 0, 1:] > log_gain[0, 0, :-1])
    assert torch.allclose(log_gain[1], log_gain[1, :, :1].expand(32, 32), atol=1e-6)  # d = 90 deg: rises with y (down)
    assert torch.allclose(log_gain[2], log_gain[2].T, atol=1e-6) and log_gain[2, 31, 31] > log_gain[2, 0, 0]
    # The saddle term bends it: no longer a plane.
    bent = (shading(flat[:1], torch.tensor([[0.7, 0.0, 1.0]])) / 0.5).log()[0, 0]
    assert (bent[0, -1] - bent[0, 0]) - (bent[-1, -1] - bent[-1, 0]) < -0.1


def test_shadow_darkens_one_side():
    flat = torch.full((1, 3, 32, 32), 0.8)
    out = shadow(flat, torch.tensor([[0.5, 0.0, 0.0, 0.01]]))[0, 0]  # line x = 0, shadow on the right
    assert torch.allclose(out[:, :12], torch.full((32, 12), 0.8), atol=1e-4)  # 4 px (13 edge scales) from the line
    assert torch.allclose(out[:, 20:], torch.full((32, 12), 0.4), atol=1e-4)
    soft = shadow(flat, torch.tensor([[0.5, 0.0, 0.0, 0.2]]))[0, 0]
    assert 0.45 < soft[0, 18] < 0.75  # a soft edge: the darkening is partial next to the line


def test_noise_has_the_expected_sigma_and_raises_high_frequencies():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((64, 1, 32, 32), 0.25)
    read = noise(flat, torch.tensor([[0.02, 0.0]]).repeat(64, 1), gen)
    assert abs(float((read - flat).std()) - 0.02) < 0.001
    # Neighbour differences of white noise have sigma sqrt(2) x sigma: high-frequency energy.
    assert abs(float(read.diff(dim=-1).std()) - 0.02 * math.sqrt(2)) < 0.0015
    shot = noise(flat, torch.tensor([[0.0, 0.04]]).repeat(64, 1), gen)
    assert abs(float((shot - flat).std()) - 0.04 * math.sqrt(0.25)) < 0.001  # shot: k sqrt(intensity)
    dark = noise(torch.full((64, 1, 32, 32), 0.04), torch.tensor([[0.0, 0.04]]).repeat(64, 1), gen)
    assert abs(float((dark - 0.04).std()) - 0.04 * math.sqrt(0.04)) < 0.0005


def test_light_sampler_is_reproducible_and_applies_every_family():
    contexts = torch.randint(0, 256, (5, 3, 80, 80), dtype=torch.uint8)
    ids = torch.tensor([0, 1, 2, 0])
    light = SurrogateSampler(contexts, LIGHT)
    a = light.sample(ids, torch.Generator().manual_seed(3))
    assert torch.equal(a, light.sample(ids, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, light.sample(ids, torch.Generator().manual_seed(4)))
    assert 0 <= a.min() and a.max() <= 1
    for family in ("gamma", "shading", "shadow", "noise"):  # each one changes the samples
        without = SurrogateSampler(contexts, LIGHT.without(family)).sample(ids, torch.Generator().manual_seed(3))
        assert not torch.allclose(without, a, atol=1e-3), family
