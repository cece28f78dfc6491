"""Exact top-k search of one cell over a document store, chunk by chunk, never holding queries x documents.

``RunningTopK`` keeps the ``k`` best (score, row) of every query. Once a query holds ``k`` documents, its k-th
score is a threshold: documents are read and scored in cache-sized chunks (``chunk_rows``), each chunk's
scores compared with the thresholds in one compiled pass while they are in cache
(``eval.kernels.add_products``), and only the documents above them are kept, so memory is bounded by one chunk
whatever the corpus size, and the cost is the kernel's plus the
upkeep of the ``k`` best (with mteb's k = 1000, about ``k ln(N / k)`` insertions per query over N documents;
float cells of large stores start from a floor guessed on a sample, which lets in a little over ``k`` instead).
Documents are read from the store with file reads (``EmbeddingStore.chunks``) and turned into the cell's vectors
or codes by the one definition of a cell (``trainer.cell_vectors``). Kernels:

- **float cells**: ``q @ x.T`` of the unit prefixes, a float32 matrix product per chunk, exactly the in-memory
  cosine;
- **1-bit cells**: exact Hamming top-k by a compiled popcount kernel (``eval.kernels.hamming_top_k``: a
  running threshold per query, carried from one block of documents to the next, so only the few documents that
  can still enter the k best are kept; 2-4x faster than faiss's ``knn_hamming`` at the k = 1000 mteb asks for,
  with the same order). The code score
  (``trainer.binary.codes.code_scores``) of 1-bit codes is ``(m - 2 H) / (|e_q| |e_d|)`` with equal norms, so
  Hamming order is score order, and the returned scores are computed exactly as ``code_scores`` computes them;
- **multi-bit cells**: the float form scaled to integers, ``2^(B-1) e = sum_i 2^(B-1-i) b_i`` (odd integers),
  multiplied as a float32 matrix product per chunk, which is exact while ``m (2^B - 1)^2 < 2^24`` (float64 beyond).
  Candidates are chosen by a float32 estimate of the cosine with a relative rounding margin, then scored exactly
  as ``code_scores`` does (float64 inner product divided by the float32 product of the norms), so the ranking
  is code_scores' ranking.

Equal scores are ordered by row (the order documents arrive in), also at the k-th place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from eval.kernels import add_candidates, add_products, doc_words, hamming_top_k, query_words, sorted_best
from trainer.binary.codes import PackedCodes
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import layer_codes, layer_name
from trainer.grid import Cell
from trainer.store import EmbeddingStore

CHUNK_BYTES = 1 << 23  # one chunk's documents as working floats: they stay in cache
HAMMING_ROWS = 1 << 18  # documents per Hamming top-k call: its k best are merged into the running ones
SCORE_BYTES = 1 << 23  # one chunk's (queries x documents) float32 scores: they stay in cache while compared
MARGIN = 2.0**-18  # relative: the float32 estimate of a score is within a few 2^-24 of it
SAMPLE_ROWS = 8192  # documents scored first to guess each query's floor (``sampled_floor``)
SAMPLE_RUNS = 64  # runs of consecutive documents they are read in


class RunningTopK:
    """The ``k`` best (score, row) of each of ``queries`` queries over chunks of documents, ties by row.

    The upkeep is compiled (``eval.kernels``): each query keeps up to ``2 k + width`` entries (16 bytes each)
    and its k-th score (or the floor it was given, whichever is higher) as a threshold; a chunk of at most
    ``width`` documents is compared with the thresholds in one pass while it is in cache, only the documents
    above them are kept, and a query's entries are cut back to its ``k`` best when the next chunk might not fit.
    """

    def __init__(self, queries: int, k: int, width: int, floor: np.ndarray | None = None) -> None:
        self.k = k
        self.scores = np.empty((queries, 2 * k + width), np.float64)
        self.rows = np.empty(self.scores.shape, np.int64)
        self.filled = np.zeros(queries, np.int64)
        self.threshold = np.full(queries, -np.inf) if floor is None else floor.astype(np.float64)

    def add_products(
        self,
        products: Tensor,
        first_row: int,
        query_norms: np.ndarray | None = None,
        doc_norms: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> None:
        """A (queries, n) chunk of documents ``first_row...``: scores ``products * scale / (|q| |d|)``, with
        ``code_scores``' rounding (``eval.kernels.add_products``); without norms, the products themselves."""
        queries, n = products.shape
        query_norms = np.ones(queries, np.float32) if query_norms is None else query_norms
        doc_norms = np.ones(n, np.float32) if doc_norms is None else doc_norms
        state = (self.scores, self.rows, self.filled, self.threshold, self.k)
        add_products(products.numpy(), query_norms, doc_norms, scale, first_row, MARGIN, *state)

    def add_candidates(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """Candidates (queries, n) of explicit rows, in arrival order; equal scores in row order (ties go by row)."""
        add_candidates(scores, rows, self.scores, self.rows, self.filled, self.threshold, self.k)

    def best(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(scores, rows), each (queries, k), best first, ties by row."""
        scores, rows = sorted_best(self.scores, self.rows, self.filled, self.k)
        return torch.from_numpy(scores).to(dtype), torch.from_numpy(rows)


def chunk_rows(queries: int, row_floats: int) -> int:
    """Documents per chunk, at least 256: (queries x chunk) float32 scores within ``SCORE_BYTES`` and (chunk x
    row_floats) working floats within ``CHUNK_BYTES``, so that a chunk is read, turned into the cell's vectors
    or codes, scored and compared while it is in cache (BENCHMARKS.md section 3: against 256 MiB chunks scored
    in cache-sized tiles, float cells 31% faster at 200k documents, as fast at 1M, and a fifth of the memory)."""
    return max(256, min(SCORE_BYTES // (4 * queries), CHUNK_BYTES // (4 * row_floats)))


def layer_chunks(store: EmbeddingStore, layers: int, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
    """(first row, the layer's stored embeddings) of consecutive document chunks."""
    for start, rows in store.chunks(layer_name(layers), rows_per_chunk):
        yield start, torch.from_numpy(rows)


def doc_codes(
    store: EmbeddingStore, cell: Cell, heads: BinaryHeads | None, rows_per_read: int, rows_per_block: int
) -> Iterator[tuple[int, PackedCodes]]:
    """(first row, the binary cell's codes) of consecutive blocks of about ``rows_per_block`` documents."""
    pending: list[PackedCodes] = []
    first = 0
    for start, layer in layer_chunks(store, cell.layers, rows_per_read):
        pending.append(layer_codes(layer, cell, heads))
        end = start + len(layer)
        if end - first >= rows_per_block or end == store.rows:
            packed = np.concatenate([codes.packed for codes in pending])
            yield first, PackedCodes(packed, cell.dim, np.concatenate([codes.norms for codes in pending]))
            pending, first = [], end


def prefix_norms(layer: Tensor, dims: Sequence[int]) -> Tensor:
    """(n, len(dims)) float32: the norm of each row's first ``d`` dims, for each ``d`` of the increasing ``dims``."""
    squares = layer.square()
    bounds = [0, *dims]
    parts = torch.stack([squares[:, lo:hi].sum(1) for lo, hi in zip(bounds, bounds[1:], strict=False)], 1)
    return parts.cumsum(1).sqrt()


def prefix_products(query: Tensor, docs: Tensor, dims: Sequence[int]) -> Iterator[Tensor]:
    """For each ``d`` of the increasing ``dims``: ``P_d = q_{:d} x_{:d}^T`` (queries x documents) of the raw rows,
    each grown from the one before, ``P_d = P_{d'} + q_{d':d} x_{d':d}^T``, in one buffer (overwritten by the
    next), so all the dims cost one product of the widest."""
    products = None
    low = 0
    for dim in dims:
        if products is None:
            products = query[:, :dim] @ docs[:, :dim].T
        else:
            products.addmm_(query[:, low:dim], docs[:, low:dim].T)
        low = dim
        yield products


def float_top_k(
    query: Tensor, store: EmbeddingStore, layers: int, dims: Sequence[int], k: int
) -> dict[int, tuple[Tensor, Tensor]]:
    """``{dim: (scores, rows)}``, each (queries, k), best first: the float cells ``L<layers>-D<dim>`` of one
    layer, all from one scan. ``query`` is the layer's (queries, width) embeddings as stored.

    A float cell's score is the cosine of its vectors (``trainer.cell_vectors.cell_vector``: the first ``d``
    dims, re-normalised), computed as ``P_d / (|q_{:d}| |x_{:d}|)`` from the raw rows (``prefix_products``,
    ``prefix_norms``); it equals ``cell_vector(q) . cell_vector(x)`` up to float32 rounding. Nested dims share
    their products, so scoring the five dims 32..384 of a layer reads the layer once and multiplies as much as
    the widest alone (BENCHMARKS.md section 3).

    On a large store each query starts from a guessed floor per dim (``sampled_floor``): only documents above it
    enter that cell's running k best. A query left with fewer than ``k`` documents above a floor (the guess was
    too high) is searched again without floors, so the result is exact either way.
    """
    k = min(k, store.rows)
    dims = sorted(set(dims))
    query = query.float()
    floors = sampled_floor(query, store, layers, dims, k)
    results = _float_scan(query, store, layers, dims, k, floors)
    missed = np.zeros(len(query), bool)
    for _, rows in results.values():
        missed |= rows[:, -1] < 0
    if missed.any():
        again = _float_scan(query[torch.from_numpy(missed)], store, layers, dims, k, None)
        for dim, (scores, rows) in results.items():
            scores[missed], rows[missed] = again[dim]
    return {dim: (torch.from_numpy(scores).float(), torch.from_numpy(rows)) for dim, (scores, rows) in results.items()}


def _float_scan(
    query: Tensor, store: EmbeddingStore, layers: int, dims: list[int], k: int, floors: dict[int, np.ndarray] | None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rows_per_chunk = chunk_rows(len(query), store.dims[layer_name(layers)])
    query_norms = prefix_norms(query, dims).clamp_min(1e-30).numpy()  # a zero prefix scores 0, as normalize gives
    best = [RunningTopK(len(query), k, rows_per_chunk, floors and floors[dim]) for dim in dims]
    for start, docs in layer_chunks(store, layers, rows_per_chunk):
        docs = docs.float()
        doc_norms = prefix_norms(docs, dims).numpy()
        for i, products in enumerate(prefix_products(query, docs, dims)):
            best[i].add_products(products, start, query_norms[:, i], doc_norms[:, i])
    return {dim: sorted_best(b.scores, b.rows, b.filled, k) for dim, b in zip(dims, best, strict=True)}


def sample_runs(rows: int) -> list[tuple[int, int]]:
    """``SAMPLE_RUNS`` runs (start, stop) of consecutive rows spread evenly over a store of ``rows`` documents,
    ``SAMPLE_ROWS`` rows in all (runs, so that the sample is read with a few file reads)."""
    run = SAMPLE_ROWS // SAMPLE_RUNS
    return [(start, start + run) for start in np.linspace(0, rows - run, SAMPLE_RUNS).astype(int).tolist()]


def sampled_floor(
    query: Tensor, store: EmbeddingStore, layers: int, dims: list[int], k: int
) -> dict[int, np.ndarray] | None:
    """Each query's guess of a score below its final k-th best, per dim: the ``r``-th best of its scores over
    ``SAMPLE_ROWS`` = m documents of N spread evenly over the store (``sample_runs``).

    The number of sampled documents at or above the final k-th score is about binomial with mean
    ``mu = k m / N`` (variance at most ``mu``), so ``r = ceil(mu + 4 sqrt(mu)) + 8`` leaves the floor below the
    k-th score unless that count is more than four standard deviations (plus 8) above its mean, which on any
    corpus whose order does not follow the sample's spacing is rare (``float_top_k`` checks and searches such
    queries again). The floor lets about ``r N / m = k + 4 sqrt(k N / m) + 8 N / m`` documents in per query
    (about 1,800 at N = 200k, k = 1,000), instead of the ``k ln(N / k)`` a threshold rising from -inf lets in.
    None (no floor) for stores under ``8 m`` documents.
    """
    if store.rows < 8 * SAMPLE_ROWS:
        return None
    name = layer_name(layers)
    sample = torch.from_numpy(np.concatenate([store.read(name, *run) for run in sample_runs(store.rows)])).float()
    expected = k * SAMPLE_ROWS / store.rows
    rank = min(SAMPLE_ROWS, math.ceil(expected + 4 * math.sqrt(expected)) + 8)
    query_norms = prefix_norms(query, dims).clamp_min(1e-30).double().numpy()
    doc_inverse = 1 / prefix_norms(sample, dims).clamp_min(1e-30)
    scores = torch.empty(len(query), len(sample))
    floors = {}
    for i, products in enumerate(prefix_products(query, sample, dims)):
        # the r-th best of P_d / |x_d|, then divided by |q_d|: the query's norm does not change its order
        torch.mul(products, doc_inverse[:, i], out=scores)
        floors[dims[i]] = np.partition(scores.numpy(), -rank, axis=1)[:, -rank] / query_norms[:, i]
    return floors


def integer_forms(codes: PackedCodes, dtype: torch.dtype) -> Tensor:
    """``2^(B-1) e = sum_i 2^(B-1-i) b_i`` (N, dim): the codes' float forms scaled to odd integers."""
    planes = torch.from_numpy(codes.unpack()).to(dtype) * 2 - 1
    return torch.einsum("nbm,b->nm", planes, 2.0 ** torch.arange(codes.bits - 1, -1, -1, dtype=dtype))


def code_top_k(
    query: PackedCodes, store: EmbeddingStore, cell: Cell, heads: BinaryHeads | None, k: int
) -> tuple[Tensor, Tensor]:
    """(scores, rows), each (queries, k), best first: ``code_scores`` of the binary cell's codes."""
    k = min(k, store.rows)
    store_dim = store.dims[layer_name(cell.layers)]
    if cell.bits == 1:
        best = RunningTopK(len(query), k, k)
        rows_per_read = chunk_rows(len(query), store_dim + 2 * cell.dim)
        queries = query_words(query.packed[:, 0])
        thresholds = np.full(len(query), cell.dim + 1, np.int64)  # each block starts below the k-th distance so far
        for start, docs in doc_codes(store, cell, heads, rows_per_read, HAMMING_ROWS):
            hamming, rows = hamming_top_k(queries, doc_words(docs.packed[:, 0]), k, cell.dim, thresholds)
            inner = cell.dim - 2 * hamming.astype(np.float64)
            norms = np.maximum(query.norms[:, None] * docs.norms[rows], np.float32(1e-12))
            best.add_candidates(np.where(rows >= 0, inner / norms, -np.inf), rows + start)
        return best.best(torch.float64)
    dtype = torch.float32 if cell.dim * (2**cell.bits - 1) ** 2 < 2**24 else torch.float64  # exact products
    query_forms, scale = integer_forms(query, dtype), 2.0 ** (2 - 2 * cell.bits)
    rows_per_chunk = chunk_rows(len(query), store_dim + 2 * cell.bits * cell.dim)
    best = RunningTopK(len(query), k, rows_per_chunk)
    for start, docs in doc_codes(store, cell, heads, rows_per_chunk, rows_per_chunk):
        best.add_products(query_forms @ integer_forms(docs, dtype).T, start, query.norms, docs.norms, scale)
    return best.best(torch.float64)
