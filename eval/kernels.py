"""The scan's compiled loops (numba): exact Hamming top-k, and the running top-k of tiles of scores.

Both are the same idea: a running threshold per query, a vectorised pass that marks the few entries that can
still enter the top k, and a scalar pass only over the marked bytes (eight marks are tested as one 64-bit
word), so the cost per (query, document) is a few vector instructions and the upkeep is paid per candidate.
Hamming distances take only ``bits + 1`` values, so that kernel counts its candidates per distance and lowers
its threshold at every admission; scores keep a buffer cut back to the k best (a partition) when full.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

TILE = 2048  # documents per tile: a tile of every query block's distances stays in cache
QUERY_BLOCK = 16  # queries per parallel task: each document tile is read once per block


@intrinsic
def _popcount(typingctx, word):  # noqa: ARG001 (numba's signature)
    """LLVM's ``ctpop`` on a uint64 (one ``popcnt``, vectorised to ``vpopcntq`` where the CPU has it)."""

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.call(builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)]), args)

    return types.uint64(types.uint64), codegen


@numba.njit(cache=True)
def _append_marked(marks: np.ndarray, n: int, base: int, out: np.ndarray, at: int) -> int:
    """Write ``base + j`` for each marked column ``j < n`` of ``marks`` (uint8 0 or 1, padded with unmarked
    entries to a multiple of 8) to ``out`` from ``at``; return the new end. Eight marks are read as one
    little-endian 64-bit word, in which mark ``j`` is bit ``8 j``: the loop visits only the set bits (the lowest
    by its trailing zeros, then cleared), so its branches follow the count of marks, not their positions."""
    words = marks.view(np.uint64)
    for g in range((n + 7) // 8):
        word = words[g]
        while word:
            out[at] = base + 8 * g + (np.int64(trailing_zeros(word)) >> 3)
            at += 1
            word &= word - np.uint64(1)
    return at


@numba.njit(parallel=True, cache=True)
def hamming_top_k(
    queries: np.ndarray, docs: np.ndarray, k: int, bits: int, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Hamming top-k below per-query thresholds: ``queries`` (Q, W) and ``docs`` transposed (W, N), codes as
    uint64 words (zero padded); returns (distances int32, rows int64), each (Q, min(k, N)): the ``k`` best of the
    documents at distances below ``thresholds[q]`` (``bits + 1``: every document), sorted by distance, ties by
    row, as faiss's counting ``knn_hamming(..., "mc")`` orders them; where a query has fewer such documents, the
    places left hold distance ``bits + 1`` and row -1. ``thresholds`` is lowered in place to each query's final
    ``t`` (below), which the next block of documents can start from: its documents at distances ``>= t`` would
    lose to ``k`` earlier ones (ties go to the earlier row).

    A distance is one of ``bits + 1`` values, so each query counts its kept entries per distance and keeps its
    threshold ``t`` at the k-th smallest distance so far (its starting threshold until ``k`` are kept), lowered
    at every admission. A document enters only if its distance is below ``t`` (it loses ties to every kept one);
    the entries, kept in arrival order, are cut back to those at distances ``<= t`` (fewer than ``2 k``) when the
    next tile might not fit, and a counting sort by distance orders them at the end."""
    n_queries, words = queries.shape
    n_docs = docs.shape[1]
    returned = min(k, n_docs)  # the threshold still counts to k: it falls only once k documents are kept
    capacity = 2 * returned + TILE
    out_distances = np.full((n_queries, returned), bits + 1, np.int32)
    out_rows = np.full((n_queries, returned), -1, np.int64)
    for block in numba.prange((n_queries + QUERY_BLOCK - 1) // QUERY_BLOCK):
        first = block * QUERY_BLOCK
        size = min(QUERY_BLOCK, n_queries - first)
        kept_distances = np.empty((size, capacity), np.int32)
        kept_rows = np.empty((size, capacity), np.int64)
        filled = np.zeros(size, np.int64)
        counts = np.zeros((size, bits + 2), np.int64)  # entries admitted at each distance
        threshold = thresholds[first : first + size].copy()
        at_most = np.zeros(size, np.int64)  # entries admitted at distances <= threshold
        distance = np.zeros(TILE, np.int32)
        marks = np.zeros(TILE, np.uint8)
        for start in range(0, n_docs, TILE):
            m = min(TILE, n_docs - start)
            for i in range(size):
                distance[:] = 0
                for w in range(words):
                    word = queries[first + i, w]
                    tile = docs[w, start : start + m]
                    for j in range(m):
                        distance[j] += np.int32(_popcount(word ^ tile[j]))
                t, n, f = threshold[i], at_most[i], filled[i]
                if f + m > capacity:  # keep the entries at distances <= t: n of them, n - counts[t] < k
                    f = 0
                    for x in range(filled[i]):
                        if kept_distances[i, x] <= t:
                            kept_distances[i, f], kept_rows[i, f] = kept_distances[i, x], kept_rows[i, x]
                            f += 1
                for j in range(m):
                    marks[j] = distance[j] < t
                marks[m:] = 0
                marked_words = marks.view(np.uint64)
                for g in range((m + 7) // 8):  # eight unmarked documents skipped at a time
                    if marked_words[g] == 0:
                        continue
                    for j in range(8 * g, 8 * g + 8):
                        d = distance[j]
                        if marks[j] and d < t:  # t may have fallen since the marks were made
                            kept_distances[i, f], kept_rows[i, f] = d, start + j
                            f += 1
                            counts[i, d] += 1
                            n += 1
                            while n - counts[i, t] >= k:
                                n -= counts[i, t]
                                t -= 1
                threshold[i], at_most[i], filled[i] = t, n, f
        thresholds[first : first + size] = threshold
        for i in range(size):  # counting sort by distance, stable in row order; the first k
            slot = np.zeros(bits + 2, np.int64)
            for x in range(filled[i]):
                slot[kept_distances[i, x] + 1] += 1
            for d in range(1, bits + 2):
                slot[d] += slot[d - 1]
            for x in range(filled[i]):
                d = kept_distances[i, x]
                if slot[d] < returned:
                    out_distances[first + i, slot[d]], out_rows[first + i, slot[d]] = d, kept_rows[i, x]
                slot[d] += 1
    return out_distances, out_rows


def query_words(packed: np.ndarray) -> np.ndarray:
    """Packed 1-bit codes (N, bytes) as uint64 words (N, words), zero padded (zero bytes add no distance)."""
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))).view(np.uint64)


def doc_words(packed: np.ndarray) -> np.ndarray:
    """``query_words`` transposed to (words, N), ``hamming_top_k``'s documents: a tile of one word is contiguous."""
    return np.ascontiguousarray(query_words(packed).T)


@numba.njit(cache=True)
def _keep_best_scores(scores: np.ndarray, rows: np.ndarray, filled: int, k: int) -> tuple[int, float]:
    """Keep, in place and in arrival order, the ``k`` best of the first ``filled`` (score, row) by score, ties by
    arrival; return how many are kept and the threshold ``t``: a later entry enters only if its score is above
    ``t`` (it loses ties to every kept one). Fewer than ``k`` entries: all are kept and ``t = -inf``."""
    if filled < k:
        return filled, -np.inf
    threshold = np.partition(scores[:filled].copy(), filled - k)[filled - k]  # the k-th largest
    return _keep_from(scores, rows, filled, threshold, k, scores, rows), threshold


@numba.njit(cache=True)
def _keep_from(
    scores: np.ndarray, rows: np.ndarray, filled: int, kth: float, k: int, out_scores: np.ndarray, out_rows: np.ndarray
) -> int:
    """Copy to ``out_scores``/``out_rows``, in arrival order, the first ``filled`` entries scoring above ``kth``
    and then as many of those scoring ``kth`` as fill ``k``, earliest first (the outputs may be the inputs: entries
    only move forward); return how many were copied."""
    ties = k
    for i in range(filled):
        ties -= scores[i] > kth
    kept = 0
    for i in range(filled):
        s = scores[i]
        if s > kth or (s == kth and ties > 0):
            ties -= s == kth
            out_scores[kept], out_rows[kept] = s, rows[i]
            kept += 1
    return kept


@numba.njit(cache=True)
def _make_room(
    kept_scores: np.ndarray, kept_rows: np.ndarray, filled: np.ndarray, threshold: np.ndarray, q: int, n: int, k: int
) -> None:
    """Cut query ``q``'s entries back to its ``k`` best (raising its threshold, never below a floor it was given)
    if ``n`` more might not fit."""
    if filled[q] + n > kept_scores.shape[1]:
        filled[q], kth = _keep_best_scores(kept_scores[q], kept_rows[q], filled[q], k)
        threshold[q] = max(threshold[q], kth)


@numba.njit(parallel=True, cache=True)
def add_products(
    products: np.ndarray,
    query_norms: np.ndarray,
    doc_norms: np.ndarray,
    scale: float,
    first_row: int,
    margin: float,
    kept_scores: np.ndarray,
    kept_rows: np.ndarray,
    filled: np.ndarray,
    threshold: np.ndarray,
    k: int,
) -> None:
    """Merge a tile of documents ``first_row...`` into each query's running ``k`` best, in place.

    The score of entry (q, j) is ``products[q, j] * scale / max(query_norms[q] * doc_norms[j], 1e-12)``, the
    inner product and norms of ``code_scores`` (the product of the float32 norms in float32, the rest in
    float64; float cells pass norms of ones and scale 1, so the score is the product itself). A vectorised
    pass marks the entries whose estimate ``products * (1 / |d|)`` (float32) is above the running threshold
    less ``margin`` (relative, far above the estimate's rounding) in the same units; only those are scored
    exactly and kept if above the threshold. State per query (row): ``kept_scores``/``kept_rows`` (capacity at
    least ``k`` + the tile's width) with ``filled`` entries, compacted to the ``k`` best (``_keep_best_scores``)
    when the next tile might not fit, which also raises ``threshold``.
    """
    n_queries, n = products.shape
    doc_inverse = (1.0 / doc_norms).astype(np.float32)
    for block in numba.prange((n_queries + QUERY_BLOCK - 1) // QUERY_BLOCK):
        marks = np.zeros(n + (-n % 8), np.uint8)
        for q in range(block * QUERY_BLOCK, min(n_queries, (block + 1) * QUERY_BLOCK)):
            _make_room(kept_scores, kept_rows, filled, threshold, q, n, k)
            limit = threshold[q]
            cut = limit - margin * abs(limit) if limit > -np.inf else -np.inf
            estimate_cut = np.float32(cut * np.float64(query_norms[q]) / scale)  # in units of products / |d|
            row = products[q]
            for j in range(n):
                marks[j] = row[j] * doc_inverse[j] > estimate_cut
            end = _append_marked(marks, n, 0, kept_rows[q], filled[q])
            f = filled[q]
            for x in range(filled[q], end):
                j = kept_rows[q, x]
                norm = max(np.float32(query_norms[q] * doc_norms[j]), np.float32(1e-12))
                score = np.float64(row[j]) * scale / np.float64(norm)
                if score > limit:
                    kept_scores[q, f], kept_rows[q, f] = score, first_row + j
                    f += 1
            filled[q] = f


@numba.njit(parallel=True, cache=True)
def add_candidates(
    scores: np.ndarray,
    rows: np.ndarray,
    kept_scores: np.ndarray,
    kept_rows: np.ndarray,
    filled: np.ndarray,
    threshold: np.ndarray,
    k: int,
) -> None:
    """Merge candidates (scores, rows), each (Q, n) in arrival order, into each query's running ``k`` best (the
    state of ``add_products``), in place."""
    n_queries, n = scores.shape
    for q in numba.prange(n_queries):
        _make_room(kept_scores, kept_rows, filled, threshold, q, n, k)
        f = filled[q]
        for i in range(n):
            if scores[q, i] > threshold[q]:
                kept_scores[q, f], kept_rows[q, f] = scores[q, i], rows[q, i]
                f += 1
        filled[q] = f


@numba.njit(parallel=True, cache=True)
def _best_in_arrival_order(
    kept_scores: np.ndarray, kept_rows: np.ndarray, filled: np.ndarray, kth: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (Q, k): every query's kept entries above its ``kth`` score, then as many of those at
    it as fill ``k``, earliest first, in arrival order (``-inf`` and row -1 where a query holds fewer)."""
    n_queries = kept_scores.shape[0]
    out_scores = np.full((n_queries, k), -np.inf)
    out_rows = np.full((n_queries, k), -1, np.int64)
    for q in numba.prange(n_queries):
        _keep_from(kept_scores[q], kept_rows[q], filled[q], kth[q], k, out_scores[q], out_rows[q])
    return out_scores, out_rows


@numba.njit(parallel=True, cache=True)
def _in_order(scores: np.ndarray, rows: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of each query permuted by its ``order`` (best first), then its rows ascending within every
    run of equal scores."""
    out_scores, out_rows = np.empty_like(scores), np.empty_like(rows)
    n = scores.shape[1]
    for q in numba.prange(scores.shape[0]):
        for x in range(n):
            out_scores[q, x], out_rows[q, x] = scores[q, order[q, x]], rows[q, order[q, x]]
        start = 0
        for x in range(1, n + 1):
            if x == n or out_scores[q, x] != out_scores[q, start]:
                if x - start > 1:
                    out_rows[q, start:x] = np.sort(out_rows[q, start:x])
                start = x
    return out_scores, out_rows


def sorted_best(
    kept_scores: np.ndarray, kept_rows: np.ndarray, filled: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (Q, k): every query's ``k`` best of its kept entries, best first, ties by row (``-inf``
    and row -1 where a query holds fewer). Every caller adds entries of equal score in row order (documents arrive
    in row order, and the Hamming top-k hands over each distance's rows in order), so ties by row are ties by
    arrival. The k-th score comes from numpy's partition and the order from numpy's sort (both vectorised); the
    ties are then put in row order."""
    width = max(int(filled.max(initial=0)), k)
    scores = np.where(np.arange(width) < filled[:, None], kept_scores[:, :width], -np.inf)
    scores.partition(width - k, axis=1)
    scores, rows = _best_in_arrival_order(kept_scores, kept_rows, filled, scores[:, width - k].copy(), k)
    return _in_order(scores, rows, np.argsort(-scores, axis=1))
