"""The one nearest-neighbour matcher (torch, batched) and its numpy conveniences."""

import numpy as np
import pytest
import torch

from exemplar_desc.matching import match_descriptors, mutual_nearest_neighbours, nearest_neighbours


def test_match_descriptors_mutual_ratio_and_chunking():
    rng = np.random.default_rng(0)
    d1 = torch.from_numpy(rng.standard_normal((300, 16)).astype(np.float32))
    perm = torch.from_numpy(rng.permutation(300))
    gen = torch.Generator().manual_seed(0)
    d0 = d1[perm] + 0.01 * torch.randn(300, 16, generator=gen)
    m0, dist0 = match_descriptors(d0, d1)
    assert torch.equal(m0, perm)
    m_chunked, d_chunked = match_descriptors(d0, d1, chunk=7)
    assert torch.equal(m_chunked, m0)
    # Each squared distance is |a|^2 + |b|^2 - 2 a.b in float32: a sum of D + 2 rounded
    # terms, so its error is at most gamma_(D+2) (|a| + |b|)^2 (Higham, Sec. 3.1), whatever
    # the blocking of the product; two computations differ by at most twice that.
    u = torch.finfo(torch.float32).eps / 2
    n = d0.shape[1] + 2
    bound = 2 * (n * u / (1 - n * u)) * (d0.norm(dim=1) + d1[m0].norm(dim=1)) ** 2
    assert ((d_chunked**2 - dist0**2).abs() <= bound).all()
    # Two identical candidates in image 1: the ratio test rejects the ambiguous match.
    dup = torch.cat([d1, d1[:1]])
    m_ratio, _ = match_descriptors(d0, dup, ratio=0.8)
    assert (m_ratio[perm == 0] == -1).all() and (m_ratio >= 0).sum() == 299
    # Not mutual: many points of image 0 share one nearest neighbour; only one survives.
    many = torch.cat([d1[:1] + 0.01 * torch.randn(5, 16, generator=gen), d1[1:2]])
    m_mut, _ = match_descriptors(many, d1[:1])
    assert (m_mut == 0).sum() == 1
    m_all, _ = match_descriptors(many, d1[:1], mutual=False)
    assert (m_all == 0).sum() == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_match_descriptors_cuda_equals_cpu():
    rng = np.random.default_rng(1)
    d0 = torch.from_numpy(rng.standard_normal((500, 128)).astype(np.float32))
    d1 = torch.from_numpy(rng.standard_normal((400, 128)).astype(np.float32))
    m_cpu, d_cpu = match_descriptors(d0, d1, ratio=0.9)
    m_gpu, d_gpu = match_descriptors(d0.cuda(), d1.cuda(), ratio=0.9)
    assert torch.equal(m_gpu.cpu(), m_cpu) and torch.allclose(d_gpu.cpu(), d_cpu, atol=1e-4)


def test_distances_are_euclidean_and_unmatched_is_inf():
    rng = np.random.default_rng(2)
    d0 = torch.from_numpy(rng.standard_normal((40, 8)))
    d1 = torch.from_numpy(rng.standard_normal((30, 8)))
    m0, dist0 = match_descriptors(d0, d1)
    assert dist0.dtype == torch.float64
    full = torch.cdist(d0, d1)
    ok = m0 >= 0
    assert torch.allclose(dist0[ok], full[ok].min(1).values, atol=1e-9)
    assert torch.isinf(dist0[~ok]).all()


def test_numpy_wrappers_agree_with_brute_force():
    rng = np.random.default_rng(3)
    d1, d2 = rng.standard_normal((50, 16)), rng.standard_normal((60, 16))
    full = np.linalg.norm(d1[:, None] - d2[None], axis=2)
    nn, dist = nearest_neighbours(d1, d2)
    np.testing.assert_array_equal(nn, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), atol=1e-9)
    pairs, pdist = mutual_nearest_neighbours(d1, d2)
    expected = [(i, j) for i, j in enumerate(full.argmin(1)) if full[:, j].argmin() == i]
    assert pairs.tolist() == [list(e) for e in expected]
    np.testing.assert_allclose(pdist, full[pairs[:, 0], pairs[:, 1]], atol=1e-9)
    assert mutual_nearest_neighbours(d1[:0], d2)[0].shape == (0, 2)


@pytest.mark.parametrize("kwargs, message", [({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"chunk": 0}, "chunk")])
def test_bad_options_are_rejected(kwargs, message):
    d = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=message):
        match_descriptors(d, d, **kwargs)
    with pytest.raises(ValueError, match="descriptors must be"):
        match_descriptors(d, torch.zeros(3, 5))
