"""Packed codes: round trips, exact popcount scores, nesting, baselines and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.binary.codes import (
    PackedCodes,
    UserError,
    code_scores,
    inner_products,
    positive,
    quantized_baseline_scores,
    sign_codes,
)


def random_planes(n: int, bits: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, bits, dim)) > 0.5


def test_pack_unpack_round_trip():
    planes = random_planes(7, 3, 24, seed=0)
    codes = PackedCodes.from_planes(planes)
    assert codes.packed.dtype == np.uint8 and codes.packed.shape == (7, 3, 3)
    assert codes.bytes_per_vector == 9
    np.testing.assert_array_equal(codes.unpack(), planes)


def test_float_form_weights_plane_i_by_two_to_minus_i():
    planes = np.zeros((1, 3, 8), dtype=bool)
    planes[0, 0, 0] = planes[0, 2, 0] = True  # coordinate 0: +1 -1/2 +1/4
    expected = np.full(8, -1 - 0.5 - 0.25)
    expected[0] = 1 - 0.5 + 0.25
    codes = PackedCodes.from_planes(planes)
    np.testing.assert_array_equal(codes.to_float()[0], expected)
    assert codes.norms[0] == pytest.approx(np.linalg.norm(expected))


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_norms_from_popcounts_equal_norms_of_float_forms_exactly(bits):
    codes = PackedCodes.from_planes(random_planes(300, bits, 384, seed=bits))
    expected = np.linalg.norm(codes.to_float(), axis=1).astype(np.float32)
    np.testing.assert_array_equal(codes.norms, expected)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_popcount_scores_equal_float_scores_exactly(bits):
    queries = PackedCodes.from_planes(random_planes(9, bits, 64, seed=1))
    docs = PackedCodes.from_planes(random_planes(13, bits, 64, seed=2))
    popcount = inner_products(queries, docs, chunk=4)
    reconstructed = queries.to_float() @ docs.to_float().T
    np.testing.assert_array_equal(popcount, reconstructed)
    np.testing.assert_array_equal(
        np.argsort(-popcount, axis=1, kind="stable"), np.argsort(-reconstructed, axis=1, kind="stable")
    )
    norms = np.linalg.norm(queries.to_float(), axis=1)[:, None] * np.linalg.norm(docs.to_float(), axis=1)[None]
    np.testing.assert_allclose(code_scores(queries, docs), reconstructed / norms, rtol=1e-6)


def test_at_depth_is_the_prefix_of_planes():
    planes = random_planes(5, 4, 16, seed=3)
    codes = PackedCodes.from_planes(planes)
    two = codes.at_depth(2)
    np.testing.assert_array_equal(two.unpack(), planes[:, :2])
    np.testing.assert_array_equal(two.to_float(), PackedCodes.from_planes(planes[:, :2]).to_float())
    with pytest.raises(UserError, match="depths 1..4"):
        codes.at_depth(5)
    with pytest.raises(UserError, match="bits=0"):
        codes.at_depth(0)


def test_unpackable_dim_is_refused():
    with pytest.raises(UserError, match="multiple of 8"):
        PackedCodes.from_planes(random_planes(2, 1, 12, seed=4))
    with pytest.raises(UserError, match="multiple of 8"):
        quantized_baseline_scores(np.ones((2, 12)), np.ones((3, 12)), "ubinary")


def test_mismatched_codes_are_refused():
    one = PackedCodes.from_planes(random_planes(2, 1, 16, seed=5))
    two = PackedCodes.from_planes(random_planes(2, 2, 16, seed=6))
    with pytest.raises(UserError, match="codes differ"):
        inner_products(one, two)


def test_sign_codes_map_zero_to_minus_one():
    codes = sign_codes(np.array([[0.5, 0.0, -0.2, 1.0, -1.0, 0.0, 3.0, -3.0]]))
    np.testing.assert_array_equal(codes.to_float()[0], [1, -1, -1, 1, -1, -1, 1, -1])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_positive_reads_the_sign_from_the_bits_exactly_as_comparing_with_zero(dtype):
    info = np.finfo(dtype)
    special = [0.0, -0.0, info.tiny, -info.tiny, info.smallest_subnormal, -info.smallest_subnormal]
    special += [info.max, -info.max, np.inf, -np.inf, 1.0, -1.0]
    x = np.concatenate([np.array(special, dtype=dtype), np.random.default_rng(0).normal(size=997).astype(dtype)])
    np.testing.assert_array_equal(positive(x.reshape(-1, 1)), x.reshape(-1, 1) > 0)
    np.testing.assert_array_equal(positive(x[::3]), x[::3] > 0)  # strided views too


def test_ubinary_baseline_equals_sign_code_inner_products():
    rng = np.random.default_rng(7)
    queries, docs = rng.normal(size=(6, 32)), rng.normal(size=(10, 32))
    ubinary = quantized_baseline_scores(queries, docs, "ubinary")
    np.testing.assert_array_equal(ubinary, inner_products(sign_codes(queries), sign_codes(docs)))


def test_int8_baseline_ranks_like_float():
    rng = np.random.default_rng(8)
    docs = rng.normal(size=(200, 32)).astype(np.float32)
    queries = docs[:20] + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    int8 = quantized_baseline_scores(queries, docs, "int8")
    assert int8.dtype == np.float64 and int8.shape == (20, 200)
    np.testing.assert_array_equal(int8.argmax(axis=1), (queries @ docs.T).argmax(axis=1))
    assert np.corrcoef(int8.ravel(), (queries @ docs.T).ravel())[0, 1] > 0.99


def test_unknown_baseline_is_refused():
    with pytest.raises(UserError, match="'ubinary' or 'int8'"):
        quantized_baseline_scores(np.ones((1, 8)), np.ones((1, 8)), "binary4")
