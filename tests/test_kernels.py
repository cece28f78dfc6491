"""The scan's compiled Hamming top-k against a brute-force sort and against faiss's counting top-k."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from eval.kernels import TILE, doc_words, flat_above, hamming_top_k, query_words


def brute_force(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of the k nearest documents by Hamming distance, ties by row (a stable sort)."""
    distances = np.unpackbits(queries[:, None, :] ^ docs[None, :, :], axis=2).sum(axis=2)
    rows = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, rows, axis=1), rows


@pytest.mark.parametrize(
    ("width", "docs", "k"),
    # 2 bytes: a handful of distances, so most of the k best are ties; several tiles and a partial one;
    # 48 bytes: six words; k above the number of documents
    [(2, 3 * TILE + 77, 40), (6, 2 * TILE + 5, 25), (48, TILE + 300, 64), (8, 50, 80)],
)
def test_hamming_top_k_is_the_exact_top_k_with_ties_in_row_order(width, docs, k):
    rng = np.random.default_rng(width)
    query_codes = rng.integers(0, 256, (37, width), dtype=np.uint8)
    doc_codes = rng.integers(0, 256, (docs, width), dtype=np.uint8)
    distances, rows = hamming_top_k(query_words(query_codes), doc_words(doc_codes), k, width * 8)
    expected_distances, expected_rows = brute_force(query_codes, doc_codes, min(k, docs))
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(rows, expected_rows)


def test_hamming_top_k_orders_as_faiss_counting_top_k():
    rng = np.random.default_rng(0)
    query_codes = rng.integers(0, 256, (50, 8), dtype=np.uint8)
    doc_codes = rng.integers(0, 256, (3 * TILE, 8), dtype=np.uint8)
    distances, rows = hamming_top_k(query_words(query_codes), doc_words(doc_codes), 100, 64)
    faiss_distances, faiss_rows = faiss.knn_hamming(query_codes, doc_codes, 100, "mc")
    np.testing.assert_array_equal(distances, faiss_distances)
    np.testing.assert_array_equal(rows, faiss_rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [2048, 2001, 5])
def test_flat_above_equals_numpy(dtype, width):
    rng = np.random.default_rng(width)
    scores = rng.standard_normal((33, width)).astype(dtype)
    cut = rng.uniform(0.5, 3.0, 33).astype(dtype)
    cut[0] = np.inf  # a query with nothing above its cut
    np.testing.assert_array_equal(flat_above(scores, cut), np.flatnonzero(scores > cut[:, None]))
