"""The learned whitening head (--whitening pairs), its positive pairs, and the head refit (--refit-head)."""

import copy
import json
import math
import re

import cv2
import numpy as np
import pytest
import torch

from exemplar_desc import ExemplarDescriptor
from exemplar_desc import train as train_module
from exemplar_desc.model_io import load_model
from exemplar_desc.networks import DescriptorHead
from exemplar_desc.patches import keypoint_frames
from exemplar_desc.training import seeds as seeds_module
from exemplar_desc.training.head import tune_head_on_pairs
from exemplar_desc.training.init_model import model_settings
from exemplar_desc.training.losses import info_nce_loss
from exemplar_desc.training.magnification import project, random_homography, shade, synthetic_view
from exemplar_desc.training.pairs import homography_jacobian, match_frames
from tests.cli_checks import assert_bad_option

#: A refit of a 16-D head with few surrogate classes; --magnification skips the tuning.
TINY = ["--refit-head", "--num-classes", "8", "--seeds-per-image", "8", "--pca-patches", "256", "--head-dim", "16",
        "--device", "cpu", "--threads", "1", "--magnification", "8"]


def _pairs(n: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n pairs x = z + e, y = z + e' of dim-D features: z shared (mean 1, variance 9), e, e' independent
    N(0, S / 2), so x - y ~ N(0, S) exactly; S a random well-conditioned covariance. Returns (x, y, S), float64."""
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    cov = a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    root = torch.linalg.cholesky(cov / 2)
    z = 3 * torch.randn(n, dim, generator=gen, dtype=torch.float64) + 1
    noise = [torch.randn(n, dim, generator=gen, dtype=torch.float64) @ root.T for _ in range(2)]
    return z + noise[0], z + noise[1], cov


@pytest.mark.parametrize("dim", [16, 6])
def test_fit_pairs_whitens_the_within_pair_covariance(dim):
    # With whiten 1 and no shrinkage the head's map is P = C^-1/2 U (C: the sample within-pair
    # covariance of n pairs, U: orthonormal columns), so the differences' true covariance S
    # becomes P^T S P, whose eigenvalues lie within those of C^-1/2 S C^-1/2, i.e. within the
    # inverse eigenvalues of a standard Gaussian sample covariance G^T G / n (G: n x D).
    # Davidson-Szarek: with probability >= 1 - 2 exp(-t^2 / 2) the singular values of G lie
    # in sqrt(n) -+ (sqrt(D) + t), so the eigenvalues of P^T S P lie in [(1 + e)^-2, (1 - e)^-2],
    # e = (sqrt(D) + t) / sqrt(n). With n = 20000, D = 16, t = 6 (failure 3e-8): [0.872, 1.158].
    n, features, t = 20000, 16, 6.0
    x, y, cov = _pairs(n, features, torch.Generator().manual_seed(0))
    head = DescriptorHead(in_channels=4, grid=2, dim=dim, power=1.0)
    ratio, count = head.fit_pairs([(x[:7000].float(), y[:7000].float()), (x[7000:].float(), y[7000:].float())], whiten=1.0, shrinkage=0.0)
    assert count == n and ratio.shape == (dim,)
    projection = head.projection.double()
    eigenvalues = torch.linalg.eigvalsh(projection.T @ cov @ projection)
    e = (math.sqrt(features) + t) / math.sqrt(n)
    assert eigenvalues.min() >= (1 + e) ** -2 and eigenvalues.max() <= (1 - e) ** -2, eigenvalues


def test_fit_pairs_rotates_onto_the_principal_axes_of_the_whitened_features():
    x, y, _ = _pairs(5000, 16, torch.Generator().manual_seed(1))
    head = DescriptorHead(in_channels=4, grid=2, dim=8, power=1.0)
    ratio, _ = head.fit_pairs([(x.float(), y.float())], whiten=1.0, shrinkage=0.3)
    both = torch.cat([x, y])
    assert torch.allclose(head.mean.double(), both.mean(0), atol=1e-5)
    projected = (both - both.mean(0)) @ head.projection.double()
    cov = projected.T @ projected / len(both)
    variances = cov.diagonal()
    assert (variances[:-1] >= variances[1:]).all()  # sorted, largest first
    # Uncorrelated up to the float32 rounding of the stored projection (relative 6e-8 per entry).
    off = cov - torch.diag(variances)
    assert off.abs().max() <= 1e-5 * variances.max()
    assert torch.all(ratio > 0) and ratio.sum() <= 1 + 1e-9
    full = DescriptorHead(in_channels=4, grid=2, dim=16, power=1.0)
    ratio, _ = full.fit_pairs([(x.float(), y.float())], whiten=1.0, shrinkage=0.3)
    assert math.isclose(ratio.sum(), 1, rel_tol=1e-12)  # every axis kept: all the whitened features' variance


def test_fit_pairs_without_whitening_is_the_pca_of_both_views():
    x, y, _ = _pairs(3000, 16, torch.Generator().manual_seed(2))
    pairs_head, pca_head = (DescriptorHead(in_channels=4, grid=2, dim=8, power=0.5) for _ in range(2))
    pairs_head.fit_pairs([(x.float(), y.float())], whiten=0.0, shrinkage=0.0)
    pca_head.fit(torch.cat([x, y]).float(), whiten=0.0)
    # Same mean and eigenvectors (the PCA divides by n - 1, which scales no eigenvector),
    # up to float32 storage of entries at most 1 and the inputs' float32 rounding.
    assert torch.allclose(pairs_head.mean, pca_head.mean, atol=1e-5)
    assert torch.allclose(pairs_head.projection, pca_head.projection, atol=1e-5)


def test_fit_pairs_emphasis_weighs_each_axis_by_a_power_of_its_variance():
    x, y, _ = _pairs(5000, 16, torch.Generator().manual_seed(4))
    plain, emphasised = (DescriptorHead(in_channels=4, grid=2, dim=8, power=1.0) for _ in range(2))
    ratio, _ = plain.fit_pairs([(x.float(), y.float())], whiten=1.0, shrinkage=0.3)
    same_ratio, _ = emphasised.fit_pairs([(x.float(), y.float())], whiten=1.0, shrinkage=0.3, emphasis=0.5)
    assert torch.equal(ratio, same_ratio) and torch.equal(plain.mean, emphasised.mean)
    # Same axes (one eigendecomposition of the same data), axis k scaled by (ratio_k x total) ** 0.5:
    # the column ratios over ratio ** 0.5 are one constant, up to the float32 storage of both maps (relative 6e-8 per entry).
    scale = emphasised.projection.double() / plain.projection.double()
    weight = scale.median(0).values / ratio.double() ** 0.5
    assert torch.allclose(scale, scale.median(0).values.expand_as(scale), rtol=1e-5)
    assert torch.allclose(weight, weight[0].expand_as(weight), rtol=1e-5)
    assert (scale.median(0).values[:-1] > scale.median(0).values[1:]).all()  # the leading axes weigh the most


def _views(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size].float(), y[i : i + size].float()) for i in range(0, len(x), size)]


def _view_loss(head: DescriptorHead, views: list[tuple[torch.Tensor, torch.Tensor]], temperature: float) -> float:
    """Mean InfoNCE over the views, each view's other pairs its negatives (as the tuning draws them)."""
    with torch.no_grad():
        describe = lambda f: torch.nn.functional.normalize((f - head.mean) @ head.projection, dim=1)  # noqa: E731
        return float(np.mean([float(info_nce_loss(describe(a), describe(b), temperature)) for a, b in views]))


def test_tuning_the_pairs_head_lowers_its_infonce_and_keeps_its_form():
    x, y, _ = _pairs(4000, 16, torch.Generator().manual_seed(5))
    views = _views(x, y, 40)
    head = DescriptorHead(in_channels=4, grid=2, dim=8, power=1.0)
    head.fit_pairs(views)
    torch.nn.init.orthogonal_(head.projection, generator=torch.Generator().manual_seed(6))  # a poor start to improve on
    mean, start = head.mean.clone(), head.projection.clone()
    before = _view_loss(head, views, 0.1)
    tuned = copy.deepcopy(head)
    final = tune_head_on_pairs(tuned, views, 200, 0.1, seed=0)
    after = _view_loss(tuned, views, 0.1)
    # Adam's small steps (1e-3 x the projection's spread) lower it by about 6 % here, far beyond float32 rounding.
    assert after < before, (before, after)
    assert not torch.equal(tuned.projection, start)
    assert math.isfinite(final) and torch.equal(tuned.mean, mean) and tuned.projection.shape == start.shape
    again = copy.deepcopy(head)
    tune_head_on_pairs(again, views, 200, 0.1, seed=0)
    assert torch.equal(again.projection, tuned.projection)  # seeded: the same views in the same order


def test_fit_pairs_checks_its_arguments():
    head = DescriptorHead(in_channels=4, grid=2, dim=8, power=1.0)
    x = torch.rand(100, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="whiten"):
        head.fit_pairs([(x, x)], whiten=1.5)
    with pytest.raises(ValueError, match="shrinkage"):
        head.fit_pairs([(x, x)], shrinkage=-0.1)
    with pytest.raises(ValueError, match="emphasis"):
        head.fit_pairs([(x, x)], emphasis=1.5)
    with pytest.raises(ValueError, match="8 pairs cannot fit a 8-D head"):
        head.fit_pairs([(x[:8], x[:8])])
    assert not torch.any(head.projection)  # nothing fitted


def test_homography_jacobian_is_the_derivative_of_the_map():
    hom = random_homography(640, 480, np.random.default_rng(4))
    xy = np.random.default_rng(5).uniform(0, [640, 480], (20, 2))
    step = 1e-3  # central differences: error O(step^2 x second derivative), far below the tolerance
    numeric = np.stack([(project(hom, xy + d) - project(hom, xy - d)) / (2 * step) for d in np.eye(2) * step], -1)
    assert np.allclose(homography_jacobian(hom, xy), numeric, atol=1e-6)


def test_match_frames_keeps_consistent_detections_once():
    rng = np.random.default_rng(6)
    hom = random_homography(640, 480, rng)
    xy0 = rng.uniform(100, [540, 380], (30, 2))
    frames0 = keypoint_frames(rng.uniform(3, 10, 30), rng.uniform(0, 360, 30), 10.0)
    xy1 = project(hom, xy0) + rng.uniform(-0.7, 0.7, (30, 2))  # within 1.5 px
    frames1 = homography_jacobian(hom, xy0) @ frames0 * rng.uniform(0.9, 1.1, (30, 1, 1))  # sizes within 10 %
    xy1[0] += 3.0  # too far
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    frames1[1] = frames1[1] @ turn  # turned by 90 degrees
    # Keypoint 2 detected twice: at a wrong angle and at the right one (a SIFT orientation pair).
    xy1, frames1 = np.concatenate([xy1, xy1[2:3]]), np.concatenate([frames1, frames1[2:3] @ turn])
    order = rng.permutation(len(xy1))
    pairs = match_frames((xy0, xy1[order]), (frames0, frames1[order]), hom)
    found = {(int(i), int(order[j])) for i, j in pairs}
    assert found == {(i, i) for i in range(2, 30)}
    assert match_frames((xy0[:0], xy1), (frames0[:0], frames1), hom).shape == (0, 2)


def test_cli_refits_a_pairs_head_on_the_init_trunk(folder, tmp_path, random_model, photo_bgr, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = [str(folder), "--init", str(random_model), *TINY, "--whitening", "pairs", "--pair-photos", "3", "--pair-views", "1",
            "--whiten", "1", "--pair-shrinkage", "0.2", "--pair-emphasis", "0.25", "--pair-tune-steps", "3", "--pair-shading", "0.4", "--workdir", str(tmp_path / "work"), "--out-dir", str(out), "--name", "pairs"]
    # With --magnification no tuning needs a surrogate PCA head, so none is fitted, and no seeds are drawn.
    monkeypatch.setattr(train_module, "fit_head_on_surrogates", lambda *args: pytest.fail("surrogate PCA fitted for nothing"))
    monkeypatch.setattr(seeds_module, "seed_candidates", lambda *args: pytest.fail("seeds drawn for nothing"))
    assert train_module.main(argv) == 0
    card = json.loads((out / "pairs.json").read_text())
    # No training step, so no surrogate validation accuracy to report.
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(re.escape(f"head refitted on the trunk of the init model {random_model} (no training step, so no surrogate "
                                  "validation accuracy); magnification 8; the head keeps ") + r"[\d.]+% of the variance", line), line
    init_card = json.loads(random_model.read_text())
    head, training = card["head"], card["training"]
    assert head["whitening"] == "pairs" and head["whiten"] == 1.0 and head["dim"] == 16
    assert head["pairs"]["photos"] == 3 and head["pairs"]["views_per_photo"] == 1 and head["pairs"]["shrinkage"] == 0.2
    assert head["pairs"]["emphasis"] == 0.25 and head["pairs"]["shading"] == 0.4
    assert model_settings(card)["pair_shading"] == 0.4  # a refit on this model's trunk shades its pairs alike
    assert head["pairs"]["tune"]["steps"] == 3 and head["pairs"]["tune"]["temperature"] == 0.03
    assert math.isfinite(head["pairs"]["tune"]["final_loss"])
    assert head["pairs"]["pairs"] > 16 and 0 < head["explained_variance"] <= 1
    assert training["refit_head"] is True and training["steps"] == 0
    assert training["init"]["model"] == str(random_model) and training["init"]["sha256"] == init_card["sha256"]
    assert training["command"].startswith("python -m exemplar_desc.train ") and "--refit-head" in training["command"]
    assert not (tmp_path / "work" / "checkpoint.pt").exists()  # no training, no checkpoint
    net, init = load_model(out / "pairs.json")[0], load_model(random_model)[0]
    trunk, init_trunk = net.trunk.state_dict(), init.trunk.state_dict()
    assert all(torch.equal(trunk[k], init_trunk[k]) for k in init_trunk)  # the init model's trunk, BN statistics too
    keypoints = cv2.SIFT_create(nfeatures=200).detect(cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2GRAY), None)
    kept, descriptors = ExemplarDescriptor(out / "pairs.json", precision="fp32").compute(photo_bgr, keypoints)
    assert descriptors.shape == (len(kept), 16) and np.isfinite(descriptors).all()
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1, atol=1e-5)


def test_cli_refits_the_pca_head(folder, tmp_path, random_model):
    out = tmp_path / "out"
    argv = [str(folder), "--init", str(random_model), *TINY, "--workdir", str(tmp_path / "work"), "--out-dir", str(out), "--name", "pca"]
    assert train_module.main(argv) == 0
    card = json.loads((out / "pca.json").read_text())
    assert card["head"]["whitening"] == "pca" and card["head"]["pairs"] is None
    assert card["training"]["refit_head"] is True and card["training"]["steps"] == 0
    assert torch.any(load_model(out / "pca.json")[0].head.projection)


@pytest.mark.parametrize("options, flag, value", [
    (["--whitening", "lda"], "--whitening", "lda"),
    (["--pair-shrinkage", "2"], "--pair-shrinkage", "2"),
    (["--pair-emphasis", "-0.5"], "--pair-emphasis", "-0.5"),
    (["--pair-temperature", "0"], "--pair-temperature", "0"),
    (["--pair-tune-steps", "5"], "--pair-tune-steps", "5"),
    (["--pair-views", "0"], "--pair-views", "0"),
    (["--pair-photos", "0"], "--pair-photos", "0"),
    (["--pair-noise", "-1"], "--pair-noise", "-1"),
    (["--pair-jpeg", "96"], "--pair-jpeg", "96"),
    (["--pair-shading", "-0.1"], "--pair-shading", "-0.1"),
    (["--whitening", "pairs", "--pca-source", "keypoints"], "--pca-source", "keypoints"),
    (["--refit-head", "--resume", "--init", "INIT"], "--refit-head", "True"),
    (["--refit-head"], "--refit-head", "True"),
])
def test_bad_options_fail_before_any_work(folder, tmp_path, random_model, capsys, options, flag, value):
    options = [str(random_model) if o == "INIT" else o for o in options]
    argv = [str(folder), *options, "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]
    assert_bad_option(train_module.main, argv, flag, value, capsys, tmp_path)


def test_sensor_noise_and_jpeg_come_after_the_views_other_draws():
    gray = cv2.cvtColor(cv2.resize(np.uint8(np.random.default_rng(0).integers(0, 256, (60, 80, 3))), (320, 240)), cv2.COLOR_BGR2GRAY)
    plain, hom = synthetic_view(gray, np.random.default_rng(1), light=True)
    noisy, hom_noisy = synthetic_view(gray, np.random.default_rng(1), light=True, noise=8.0)
    both, hom_both = synthetic_view(gray, np.random.default_rng(1), light=True, noise=8.0, jpeg=10)
    assert np.array_equal(hom, hom_noisy) and np.array_equal(hom, hom_both)  # the same geometry
    assert noisy.dtype == both.dtype == np.uint8 and noisy.shape == both.shape == gray.shape
    # Noise of sigma at most 8 grey levels: the mean change is below 8, and not nothing.
    change = np.abs(noisy.astype(float) - plain).mean()
    assert 0 < change < 8
    assert not np.array_equal(both, noisy)  # the compression changed the view
    again, _ = synthetic_view(gray, np.random.default_rng(1), light=True, noise=8.0, jpeg=10)
    assert np.array_equal(both, again)


def test_shade_reaches_its_strength_and_casts_shadows():
    """On a flat grey view, the field to the power 1/2.2: at most e^(S/2.2), at least (0.3^2 e^-S)^(1/2.2)."""
    strength, rng = 0.6, np.random.default_rng(2)
    ratios = np.stack([shade(np.full((60, 80), 128, np.uint8), strength, rng) / 128.0 for _ in range(60)])
    half = 0.5 / 128  # the rounding to a grey level
    assert ratios.max() <= np.exp(strength / 2.2) + half and ratios.min() >= (0.09 * np.exp(-strength)) ** (1 / 2.2) - half
    assert ratios.max() > np.exp(0.9 * strength / 2.2)  # 60 draws come near the largest shading
    assert ratios.min() < np.exp(-strength / 2.2)  # a shadow darkens beyond any shading


def test_shading_comes_after_the_light_and_before_the_noise():
    gray = cv2.cvtColor(cv2.resize(np.uint8(np.random.default_rng(0).integers(0, 256, (60, 80, 3))), (320, 240)), cv2.COLOR_BGR2GRAY)
    plain, hom = synthetic_view(gray, np.random.default_rng(1), light=True)
    strength = 0.6
    shaded, hom_shaded = synthetic_view(gray, np.random.default_rng(1), light=True, shading=strength)
    assert np.array_equal(hom, hom_shaded) and shaded.dtype == np.uint8 and shaded.shape == gray.shape
    assert not np.array_equal(shaded, plain)
    # In linear light the field lies in [0.3^2 e^-S, e^S] (two shadows keeping 0.3 at least); in grey
    # levels that is a factor to the power 1/2.2 on the plain view, then rounded to half a grey level.
    low, high = (0.09 * np.exp(-strength)) ** (1 / 2.2), np.exp(strength) ** (1 / 2.2)
    p, s = plain.astype(float), shaded.astype(float)
    assert np.all(s >= low * p - 0.5) and np.all(s <= np.minimum(255, high * p) + 0.5)
    # The noise draws after the shading: the same field, so the views differ by the noise alone.
    noisy, _ = synthetic_view(gray, np.random.default_rng(1), light=True, shading=strength, noise=8.0)
    assert 0 < np.abs(noisy.astype(float) - s).mean() < 8
    # Without shading nothing is drawn, so earlier runs keep their random stream.
    kept, before = np.random.default_rng(1), np.random.default_rng(1)
    synthetic_view(gray, kept, light=True, shading=0.0), synthetic_view(gray, before, light=True)
    assert kept.random() == before.random()
