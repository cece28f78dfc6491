"""The scan's two compiled loops (numba): exact Hamming top-k, and the entries of a score tile above thresholds.

Both are the same idea: a running threshold per query, a vectorised pass that marks the few entries that can
still enter the top k, and a scalar pass only over the marked bytes (eight marks are tested as one 64-bit
word), so the cost per (query, document) is a few vector instructions and the upkeep is paid per candidate.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
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
def _keep_best(distances: np.ndarray, rows: np.ndarray, filled: int, k: int, bits: int) -> tuple[int, int]:
    """Keep, in place and in arrival order, the ``k`` best of the first ``filled`` (distance, row) by distance,
    ties by arrival; return how many are kept and the threshold ``t``: a later document enters only if its
    distance is below ``t`` (it loses ties to every kept one)."""
    counts = np.zeros(bits + 2, np.int64)
    for i in range(filled):
        counts[distances[i]] += 1
    below, threshold = 0, 0
    while below + counts[threshold] < k:
        below += counts[threshold]
        threshold += 1
    ties = k - below
    kept = 0
    for i in range(filled):
        d = distances[i]
        if d < threshold or (d == threshold and ties > 0):
            ties -= d == threshold
            distances[kept], rows[kept] = d, rows[i]
            kept += 1
    return kept, threshold


@numba.njit(cache=True)
def _append_marked(marks: np.ndarray, n: int, base: int, out: np.ndarray, at: int) -> int:
    """Write ``base + j`` for each marked column ``j < n`` of ``marks`` (uint8, padded with unmarked entries
    to a multiple of 8) to ``out`` from ``at``, skipping eight unmarked entries at a time; return the new end."""
    words = marks.view(np.uint64)
    for g in range((n + 7) // 8):
        if words[g] == 0:
            continue
        for j in range(8 * g, 8 * g + 8):
            if marks[j]:
                out[at] = base + j
                at += 1
    return at


@numba.njit(parallel=True, cache=True)
def hamming_top_k(queries: np.ndarray, docs: np.ndarray, k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Hamming top-k: ``queries`` (Q, W) and ``docs`` transposed (W, N), codes as uint64 words (zero
    padded); returns (distances int32, rows int64), each (Q, min(k, N)), sorted by distance, ties by row, as
    faiss's counting ``knn_hamming(..., "mc")`` orders them."""
    n_queries, words = queries.shape
    n_docs = docs.shape[1]
    k = min(k, n_docs)
    capacity = 2 * k + TILE
    out_distances = np.empty((n_queries, k), np.int32)
    out_rows = np.empty((n_queries, k), np.int64)
    for block in numba.prange((n_queries + QUERY_BLOCK - 1) // QUERY_BLOCK):
        first = block * QUERY_BLOCK
        size = min(QUERY_BLOCK, n_queries - first)
        kept_distances = np.empty((size, capacity), np.int32)
        kept_rows = np.empty((size, capacity), np.int64)
        filled = np.zeros(size, np.int64)
        threshold = np.full(size, bits + 1, np.int32)
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
                limit = threshold[i]
                for j in range(m):
                    marks[j] = distance[j] < limit
                marks[m:] = 0
                f = _append_marked(marks, m, start, kept_rows[i], filled[i])
                for x in range(filled[i], f):
                    kept_distances[i, x] = distance[kept_rows[i, x] - start]
                filled[i] = f
                if f > capacity - TILE:
                    filled[i], threshold[i] = _keep_best(kept_distances[i], kept_rows[i], f, k, bits)
        for i in range(size):
            kept, _ = _keep_best(kept_distances[i], kept_rows[i], filled[i], k, bits)
            slot = np.zeros(bits + 2, np.int64)  # counting sort by distance, stable in row order
            for x in range(kept):
                slot[kept_distances[i, x] + 1] += 1
            for d in range(1, bits + 2):
                slot[d] += slot[d - 1]
            for x in range(kept):
                d = kept_distances[i, x]
                out_distances[first + i, slot[d]], out_rows[first + i, slot[d]] = d, kept_rows[i, x]
                slot[d] += 1
    return out_distances, out_rows


def query_words(packed: np.ndarray) -> np.ndarray:
    """Packed 1-bit codes (N, bytes) as uint64 words (N, words), zero padded (zero bytes add no distance)."""
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))).view(np.uint64)


def doc_words(packed: np.ndarray) -> np.ndarray:
    """``query_words`` transposed to (words, N), ``hamming_top_k``'s documents: a tile of one word is contiguous."""
    return np.ascontiguousarray(query_words(packed).T)


@numba.njit(parallel=True, cache=True)
def _marked_counts(scores: np.ndarray, cut: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Per query (row of ``scores``), mark the entries above its ``cut`` and count them."""
    n_queries, n = scores.shape
    counts = np.zeros(n_queries, np.int64)
    for q in numba.prange(n_queries):
        limit = cut[q]
        c = 0
        for j in range(n):
            above = scores[q, j] > limit
            marks[q, j] = above
            c += above
        counts[q] = c
    return counts


@numba.njit(parallel=True, cache=True)
def _gather_marked(marks: np.ndarray, offsets: np.ndarray, width: int, out: np.ndarray) -> None:
    """The flat indices ``q * width + j`` of the marked entries, in row-major order, written from ``offsets``
    (``marks`` is padded to a multiple of 8 columns with unmarked ones)."""
    for q in numba.prange(marks.shape[0]):
        _append_marked(marks[q], width, q * width, out, offsets[q])


def flat_above(scores: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(scores > cut[:, None])`` for a C-contiguous (queries, n) tile, in two passes: a
    vectorised mark-and-count, then a gather that skips eight unmarked entries at a time."""
    n = scores.shape[1]
    marks = np.zeros((scores.shape[0], n + (-n % 8)), np.uint8)
    counts = _marked_counts(scores, cut, marks[:, :n])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = np.empty(int(offsets[-1]), np.int64)
    _gather_marked(marks, offsets[:-1], n, out)
    return out
