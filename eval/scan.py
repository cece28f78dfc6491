"""Exact top-k search of one cell over a document store, chunk by chunk, never holding queries x documents.

``RunningTopK`` keeps the ``k`` best (score, row) of every query. Once a query holds ``k`` documents, its k-th
score is a threshold: a chunk's scores are compared with it in one pass and only the few documents above it
are merged, so memory is bounded by one chunk (``BLOCK_BYTES``) whatever the corpus size, and the cost is the
kernel's. Documents are read from the store with file reads (``EmbeddingStore.read``) and turned into the
cell's vectors or codes by the one definition of a cell (``trainer.cell_vectors``). Kernels:

- **float cells**: ``q @ x.T`` of the unit prefixes, a float32 matrix product per chunk, exactly the
  in-memory cosine;
- **1-bit cells**: Hamming top-k by faiss (``knn_hamming``, the kernel of ``IndexBinaryFlat``). The code score
  (``trainer.binary.codes.code_scores``) of 1-bit codes is ``(m - 2 H) / (|e_q| |e_d|)`` with equal norms, so
  Hamming order is score order, and the returned scores are computed exactly as ``code_scores`` computes them;
- **multi-bit cells**: the float form scaled to integers, ``2^(B-1) e = sum_i 2^(B-1-i) b_i`` (odd integers),
  multiplied as a float32 matrix product, which is exact while ``m (2^B - 1)^2 < 2^24`` (float64 beyond).
  Candidates are chosen by the float32 cosine with a relative rounding margin, then scored exactly as
  ``code_scores`` does (float64 inner product divided by the float32 product of the norms), so the ranking is
  code_scores' ranking.

Ties at the k-th score are resolved by arrival order, as ``numpy.argpartition`` resolves them by its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from trainer.binary.codes import PackedCodes
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_codes, cell_vector, layer_name
from trainer.grid import Cell
from trainer.store import EmbeddingStore

BLOCK_BYTES = 1 << 28  # one chunk's (queries x documents) float32 scores, and its documents' working arrays
HAMMING_ROWS = 1 << 18  # documents per faiss call: larger calls amortise its per-call top-k set-up
MARGIN = 2.0**-18  # relative: float32 cosines of exact integer products are within 2^-23 of the float64 ones


class RunningTopK:
    """The ``k`` best (score, row) of each of ``queries`` queries over chunks of documents, best first."""

    def __init__(self, queries: int, k: int, dtype: torch.dtype) -> None:
        self.k = k
        self.scores = torch.full((queries, k), -torch.inf, dtype=dtype)
        self.rows = torch.full((queries, k), -1, dtype=torch.long)

    def add_scores(
        self,
        scores: Tensor,
        first_row: int,
        exact: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        """A dense (queries, chunk) block of scores of rows ``first_row...``. With ``exact``, ``scores`` are
        float32 approximations (within ``MARGIN``) and ``exact(q, c)`` the true scores of entries ``(q, c)``."""
        if bool(torch.isinf(self.scores[:, -1]).any()):  # not k documents yet: merge the whole block
            if exact is not None:
                scores = exact(torch.arange(len(scores))[:, None], torch.arange(scores.shape[1])[None, :])
            self.merge(scores, first_row=first_row)
            return
        cut = self.scores[:, -1].to(scores.dtype)
        if exact is not None:
            cut = cut - MARGIN * cut.abs()
        query, column = torch.nonzero(scores > cut[:, None] if exact is None else scores >= cut[:, None], as_tuple=True)
        values = scores[query, column] if exact is None else exact(query, column)
        self.add_candidates(query, column + first_row, values)

    def add_candidates(self, query: Tensor, rows: Tensor, values: Tensor) -> None:
        """Scored documents ``rows`` of queries ``query`` (ascending); only those above the k-th score count."""
        keep = values > self.scores[query, -1]
        query, rows, values = query[keep], rows[keep], values[keep]
        if not len(query):
            return
        counts = torch.bincount(query, minlength=len(self.scores))
        slot = torch.arange(len(query)) - (torch.cumsum(counts, 0) - counts)[query]
        block = torch.full((len(self.scores), int(counts.max())), -torch.inf, dtype=self.scores.dtype)
        block_rows = torch.full(block.shape, -1, dtype=torch.long)
        block[query, slot], block_rows[query, slot] = values.to(block.dtype), rows
        self.merge(block, block_rows)

    def merge(self, scores: Tensor, rows: Tensor | None = None, first_row: int = 0) -> None:
        """A dense (queries, n) block of candidates, of ``rows`` or else of rows ``first_row + column``: keep the
        ``k`` best of them and the running ones."""
        best = torch.cat([self.scores, scores.to(self.scores.dtype)], dim=1).topk(self.k, dim=1)
        column = best.indices - self.k
        running = self.rows.gather(1, best.indices.clamp(max=self.k - 1))
        new = column + first_row if rows is None else rows.gather(1, column.clamp(min=0))
        self.scores, self.rows = best.values, torch.where(column < 0, running, new)


def chunk_rows(queries: int, row_floats: int) -> int:
    """Documents per chunk: (queries x chunk) scores and (chunk x row_floats) working floats within a block."""
    return max(1024, BLOCK_BYTES // (4 * max(queries, row_floats)))


def doc_vectors(store: EmbeddingStore, cell: Cell, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
    """(first row, the float cell's unit vectors) of consecutive document chunks."""
    name = layer_name(cell.layers)
    for start in range(0, store.rows, rows_per_chunk):
        layer = torch.from_numpy(store.read(name, start, min(start + rows_per_chunk, store.rows)))
        yield start, cell_vector({cell.layers: layer}, cell.with_bits(32))


def doc_codes(
    store: EmbeddingStore, cell: Cell, heads: BinaryHeads | None, rows_per_read: int, rows_per_block: int
) -> Iterator[tuple[int, PackedCodes]]:
    """(first row, the binary cell's codes) of consecutive blocks of about ``rows_per_block`` documents."""
    pending: list[PackedCodes] = []
    first = 0
    for start, vectors in doc_vectors(store, cell, rows_per_read):
        pending.append(cell_codes(vectors, cell, heads))
        end = start + len(vectors)
        if end - first >= rows_per_block or end == store.rows:
            packed = np.concatenate([codes.packed for codes in pending])
            yield first, PackedCodes(packed, cell.dim, np.concatenate([codes.norms for codes in pending]))
            pending, first = [], end


def float_top_k(query: Tensor, store: EmbeddingStore, cell: Cell, k: int) -> tuple[Tensor, Tensor]:
    """(scores, rows), each (queries, k), best first: the cosine of the float cell's unit vectors."""
    best = RunningTopK(len(query), min(k, store.rows), torch.float32)
    for start, docs in doc_vectors(store, cell, chunk_rows(len(query), store.dims[layer_name(cell.layers)])):
        best.add_scores(query @ docs.T, start)
    return best.scores, best.rows


def integer_forms(codes: PackedCodes, dtype: torch.dtype) -> Tensor:
    """``2^(B-1) e = sum_i 2^(B-1-i) b_i`` (N, dim): the codes' float forms scaled to odd integers."""
    planes = torch.from_numpy(codes.unpack()).to(dtype) * 2 - 1
    return torch.einsum("nbm,b->nm", planes, 2.0 ** torch.arange(codes.bits - 1, -1, -1, dtype=dtype))


def _norm_products(query: PackedCodes, docs_norms: np.ndarray) -> Tensor:
    """``|e_q| |e_d|`` in float32, clipped, exactly as ``code_scores`` forms its denominator."""
    return (torch.from_numpy(query.norms)[:, None] * torch.from_numpy(docs_norms)).clamp_min(1e-12)


def code_top_k(
    query: PackedCodes, store: EmbeddingStore, cell: Cell, heads: BinaryHeads | None, k: int
) -> tuple[Tensor, Tensor]:
    """(scores, rows), each (queries, k), best first: ``code_scores`` of the binary cell's codes."""
    best = RunningTopK(len(query), min(k, store.rows), torch.float64)
    store_dim = store.dims[layer_name(cell.layers)]
    if cell.bits == 1:
        import faiss

        rows_per_read = chunk_rows(0, store_dim + 2 * cell.dim)
        for start, docs in doc_codes(store, cell, heads, rows_per_read, HAMMING_ROWS):
            hamming, rows = faiss.knn_hamming(query.packed[:, 0], docs.packed[:, 0], min(best.k, len(docs)))
            inner = torch.from_numpy(cell.dim - 2 * hamming.astype(np.float64))
            best.merge(inner / _norm_products(query, docs.norms[rows]), torch.from_numpy(rows) + start)
        return best.scores, best.rows
    exact_in_float32 = cell.dim * (2**cell.bits - 1) ** 2 < 2**24
    dtype = torch.float32 if exact_in_float32 else torch.float64
    scale = 2.0 ** (2 - 2 * cell.bits)
    query_forms = integer_forms(query, dtype)
    rows_per_chunk = chunk_rows(len(query), store_dim + 2 * cell.bits * cell.dim)
    for start, docs in doc_codes(store, cell, heads, rows_per_chunk, rows_per_chunk):
        inner = query_forms @ integer_forms(docs, dtype).T
        norms = _norm_products(query, docs.norms)
        if not exact_in_float32:
            best.add_scores(inner * scale / norms.double(), start)
            continue

        def exact(q: Tensor, c: Tensor, inner: Tensor = inner, norms: Tensor = norms) -> Tensor:
            return inner[q, c].double() * scale / norms[q, c].double()

        best.add_scores(inner / norms * scale, start, exact)
    return best.scores, best.rows
