"""The scan's compiled kernels: the Hamming top-k against a brute-force sort and faiss's counting top-k, and the
running top-k of score tiles and candidates against a stable sort."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from eval.kernels import TILE, add_candidates, add_products, doc_words, hamming_top_k, query_words, sorted_best


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
    every = np.full(37, width * 8 + 1)
    distances, rows = hamming_top_k(query_words(query_codes), doc_words(doc_codes), k, width * 8, every)
    expected_distances, expected_rows = brute_force(query_codes, doc_codes, min(k, docs))
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(rows, expected_rows)


def test_hamming_top_k_orders_as_faiss_counting_top_k():
    rng = np.random.default_rng(0)
    query_codes = rng.integers(0, 256, (50, 8), dtype=np.uint8)
    doc_codes = rng.integers(0, 256, (3 * TILE, 8), dtype=np.uint8)
    distances, rows = hamming_top_k(query_words(query_codes), doc_words(doc_codes), 100, 64, np.full(50, 65))
    faiss_distances, faiss_rows = faiss.knn_hamming(query_codes, doc_codes, 100, "mc")
    np.testing.assert_array_equal(distances, faiss_distances)
    np.testing.assert_array_equal(rows, faiss_rows)


def test_hamming_top_k_below_thresholds_keeps_only_closer_documents():
    """A threshold per query: only documents below it enter; places left are distance bits + 1 and row -1; the
    thresholds come back lowered to each query's k-th distance where k documents were found."""
    rng = np.random.default_rng(5)
    query_codes = rng.integers(0, 256, (21, 2), dtype=np.uint8)
    doc_codes = rng.integers(0, 256, (TILE + 300, 2), dtype=np.uint8)
    thresholds = rng.integers(0, 10, 21)
    given = thresholds.copy()
    distances, rows = hamming_top_k(query_words(query_codes), doc_words(doc_codes), 30, 16, thresholds)
    all_distances, all_rows = brute_force(query_codes, doc_codes, len(doc_codes))
    for q in range(21):
        below = all_distances[q] < given[q]
        found = min(30, int(below.sum()))
        np.testing.assert_array_equal(distances[q, :found], all_distances[q, below][:found])
        np.testing.assert_array_equal(rows[q, :found], all_rows[q, below][:found])
        assert (distances[q, found:] == 17).all() and (rows[q, found:] == -1).all()
        assert thresholds[q] == (all_distances[q, below][29] if found == 30 else given[q])


# blocks larger and smaller than k, and k above the number of documents (every one must come back)
@pytest.mark.parametrize(("block", "docs", "k"), [(300, 2000, 40), (30, 2000, 40), (30, 60, 100)])
def test_hamming_top_k_over_blocks_with_carried_thresholds_is_the_exact_top_k(block, docs, k):
    """Blocks of documents, each starting from the thresholds the blocks before left: merged by distance, then
    row, the candidates hold the exact top-k of all the documents (ties to the earlier row)."""
    rng = np.random.default_rng(6)
    query_codes = rng.integers(0, 256, (19, 2), dtype=np.uint8)
    doc_codes = rng.integers(0, 256, (docs, 2), dtype=np.uint8)
    thresholds = np.full(19, 17)
    found = []
    for start in range(0, docs, block):
        distances, rows = hamming_top_k(
            query_words(query_codes), doc_words(doc_codes[start : start + block]), k, 16, thresholds
        )
        found.append((distances, np.where(rows >= 0, rows + start, -1)))
    distances, rows = np.concatenate([d for d, _ in found], axis=1), np.concatenate([r for _, r in found], axis=1)
    order = np.lexsort((rows, distances), axis=1)[:, :k]
    expected_distances, expected_rows = brute_force(query_codes, doc_codes, k)
    np.testing.assert_array_equal(np.take_along_axis(distances, order, axis=1), expected_distances)
    np.testing.assert_array_equal(np.take_along_axis(rows, order, axis=1), expected_rows)


def running_top_k(tiles: list[tuple], queries: int, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``(products, query_norms, doc_norms, scale)`` tiles of consecutive rows through ``add_products``."""
    state = (np.empty((queries, 2 * k + width)), np.empty((queries, 2 * k + width), np.int64))
    filled, threshold = np.zeros(queries, np.int64), np.full(queries, -np.inf)
    first_row = 0
    for products, query_norms, doc_norms, scale in tiles:
        add_products(products, query_norms, doc_norms, scale, first_row, 2.0**-18, *state, filled, threshold, k)
        first_row += products.shape[1]
    return sorted_best(*state, filled, k)


def stable_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row, best first, ties by column (a stable sort)."""
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


@pytest.mark.parametrize(("width", "docs", "k"), [(256, 2000, 100), (300, 1000, 40), (64, 50, 80)])
def test_running_top_k_of_float_tiles_is_the_stable_top_k(width, docs, k):
    """Scores rounded to a few values (most of the k best are ties), many tiles, a partial one, k > docs."""
    rng = np.random.default_rng(width)
    scores = np.round(rng.standard_normal((23, docs)), 1).astype(np.float32)
    queries = np.ones(23, np.float32)
    tiles = [
        (scores[:, i : i + width], queries, np.ones(min(width, docs - i), np.float32), 1.0)
        for i in range(0, docs, width)
    ]
    got_scores, got_rows = running_top_k(tiles, 23, min(k, docs), width)
    expected_scores, expected_rows = stable_top_k(scores.astype(np.float64), min(k, docs))
    np.testing.assert_array_equal(got_scores, expected_scores)
    np.testing.assert_array_equal(got_rows, expected_rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_top_k_scores_products_as_code_scores_does(dtype):
    """Integer products over varied norms: the exact ``inner * scale / max(|q| |d|, 1e-12)`` of ``code_scores``
    (float32 norm products), chosen through the float64 estimate; ties (equal products and norms) by row."""
    rng = np.random.default_rng(1)
    products = rng.integers(-40, 40, (19, 1500)).astype(dtype)
    query_norms = rng.choice([3.0, 5.5, 7.25], 19).astype(np.float32)
    doc_norms = rng.choice([4.0, 6.5, 9.75], 1500).astype(np.float32)
    scale = 2.0**-2
    exact = products.astype(np.float64) * scale / np.maximum(np.outer(query_norms, doc_norms), np.float32(1e-12))
    tiles = [(products[:, i : i + 256], query_norms, doc_norms[i : i + 256], scale) for i in range(0, 1500, 256)]
    got_scores, got_rows = running_top_k(tiles, 19, 60, 256)
    expected_scores, expected_rows = stable_top_k(exact, 60)
    np.testing.assert_array_equal(got_scores, expected_scores)
    np.testing.assert_array_equal(got_rows, expected_rows)


def test_running_top_k_merges_candidates_of_explicit_rows():
    """Blocks of (score, row) candidates, as the Hamming top-k hands them over: the stable top-k of all."""
    rng = np.random.default_rng(2)
    scores = np.round(rng.standard_normal((11, 900)), 1)
    state = (np.empty((11, 3 * 50)), np.empty((11, 3 * 50), np.int64))
    filled, threshold = np.zeros(11, np.int64), np.full(11, -np.inf)
    for start in range(0, 900, 50):
        block_scores, block_rows = stable_top_k(scores[:, start : start + 50], 50)
        add_candidates(block_scores, block_rows + start, *state, filled, threshold, 50)
    got_scores, got_rows = sorted_best(*state, filled, 50)
    expected_scores, expected_rows = stable_top_k(scores, 50)
    np.testing.assert_array_equal(got_scores, expected_scores)
    np.testing.assert_array_equal(got_rows, expected_rows)
