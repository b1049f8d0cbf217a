import numpy as np
import pytest

from exemplar_desc.quantization import quantize_uint8


def test_sift_rule_is_colmaps():
    desc = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    assert quantize_uint8(desc).tolist() == [[255, 255, 0], [0, 0, 0]]  # 512 x (0.6, 0.8) clipped
    small = np.array([[0.1] * 100], np.float32)
    assert quantize_uint8(small)[0, 0] == 51  # round(512 x 0.1)


def test_signed_encoding_keeps_the_ranking_of_dot_products_and_l2():
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(200, 128)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    q = quantize_uint8(desc, signed=True)
    assert q.min() >= 1 and q.max() <= 255
    norms = np.linalg.norm(q.astype(np.float64), axis=1)
    assert norms.std() / norms.mean() < 0.002  # constant norm up to rounding
    centred = desc - desc.mean(1, keepdims=True)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    l2 = np.linalg.norm(centred[:, None] - centred[None], axis=2)
    # Noisy copies: the nearest neighbour by the bytes' dot product is the one by float L2.
    noisy = desc + rng.normal(scale=0.05, size=desc.shape).astype(np.float32)
    qn = quantize_uint8(noisy, signed=True)
    dot = q.astype(np.int64) @ qn.astype(np.int64).T
    noisy_c = noisy - noisy.mean(1, keepdims=True)
    noisy_c /= np.linalg.norm(noisy_c, axis=1, keepdims=True)
    float_l2 = np.linalg.norm(centred[:, None] - noisy_c[None], axis=2)
    assert np.array_equal(dot.argmax(1), float_l2.argmin(1))
    byte_l2 = np.linalg.norm(q[:1].astype(np.float64) - q.astype(np.float64), axis=1)
    assert np.allclose(byte_l2, 127 * l2[0], atol=6)


def test_bad_input():
    with pytest.raises(ValueError):
        quantize_uint8(np.zeros(5))
    with pytest.raises(ValueError):
        quantize_uint8(np.full((2, 2), np.nan))
