"""Exact top-k search of one cell over a document store, chunk by chunk, never holding queries x documents.

``RunningTopK`` keeps the ``k`` best (score, row) of every query. Once a query holds ``k`` documents, its k-th
score is a threshold: a chunk is scored one cache-sized tile (``TILE_BYTES``) at a time, each tile compared
with the thresholds in one pass while it is in cache, and only the documents above them are merged, so memory
is bounded by one chunk (``BLOCK_BYTES``) whatever the corpus size, and the cost is the kernel's plus the
upkeep of the ``k`` best (with mteb's k = 1000, about ``k ln(N / k)`` insertions per query over N documents).
Documents are read from the store with file reads (``EmbeddingStore.read``) and turned into the cell's vectors
or codes by the one definition of a cell (``trainer.cell_vectors``). Kernels:

- **float cells**: ``q @ x.T`` of the unit prefixes, a float32 matrix product per tile, exactly the in-memory
  cosine;
- **1-bit cells**: exact Hamming top-k by a compiled popcount kernel (``eval.kernels.hamming_top_k``: a
  running threshold per query, so only the few documents that can still enter the k best are kept; 2-4x
  faster than faiss's ``knn_hamming`` at the k = 1000 mteb asks for, with the same order). The code score
  (``trainer.binary.codes.code_scores``) of 1-bit codes is ``(m - 2 H) / (|e_q| |e_d|)`` with equal norms, so
  Hamming order is score order, and the returned scores are computed exactly as ``code_scores`` computes them;
- **multi-bit cells**: the float form scaled to integers, ``2^(B-1) e = sum_i 2^(B-1-i) b_i`` (odd integers),
  multiplied as a float32 matrix product per tile, which is exact while ``m (2^B - 1)^2 < 2^24`` (float64 beyond).
  Candidates are chosen by the float32 cosine with a relative rounding margin, then scored exactly as
  ``code_scores`` does (float64 inner product divided by the float32 product of the norms), so the ranking is
  code_scores' ranking.

Ties at the k-th score are resolved by arrival order, as ``numpy.argpartition`` resolves them by its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from torch import Tensor

from eval.kernels import doc_words, flat_above, hamming_top_k, query_words
from trainer.binary.codes import PackedCodes
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_vector, layer_codes, layer_name
from trainer.grid import Cell
from trainer.store import EmbeddingStore

BLOCK_BYTES = 1 << 28  # one chunk's (queries x documents) float32 scores, and its documents' working arrays
HAMMING_ROWS = 1 << 18  # documents per Hamming top-k call: its k best are merged into the running ones
TILE_BYTES = 1 << 23  # one tile's (queries x documents) float32 scores: they stay in cache while compared
MARGIN = 2.0**-18  # relative: float32 cosines of exact integer products are within 2^-23 of the float64 ones

Exact = Callable[[Tensor, Tensor], Tensor]  # the true scores of entries (query, column) of a tile


class RunningTopK:
    """The ``k`` best (score, row) of each of ``queries`` queries over chunks of documents, best first."""

    def __init__(self, queries: int, k: int, dtype: torch.dtype) -> None:
        self.k = k
        self.scores = torch.full((queries, k), -torch.inf, dtype=dtype)
        self.rows = torch.full((queries, k), -1, dtype=torch.long)

    @property
    def full(self) -> bool:
        """Whether every query holds ``k`` documents (its k-th score is then a threshold)."""
        return not bool(torch.isinf(self.scores[:, -1]).any())

    def add_tiles(self, tiles: Iterator[tuple[int, Tensor, Exact | None]]) -> None:
        """Dense (queries, n) tiles of scores of rows ``first_row...``, given as ``(first_row, scores, exact)``.
        With ``exact``, ``scores`` are float32 approximations (within ``MARGIN``) and ``exact(q, c)`` the true
        scores of entries ``(q, c)``.

        Each tile is compared with the running k-th scores while it is still in cache; only the documents
        above them are kept, in one dense block per tile, and the blocks are merged once they hold ``k``
        columns (or at the end). So the cost is the tiles' plus one pass over each and the few candidates.
        """
        blocks: list[tuple[Tensor, Tensor]] = []
        for first_row, scores, exact in tiles:
            if not self.full:
                if exact is not None:
                    scores = exact(torch.arange(len(scores))[:, None], torch.arange(scores.shape[1])[None, :])
                self.merge(scores, first_row=first_row)
                continue
            cut = self.scores[:, -1].to(scores.dtype).numpy()
            if exact is not None:  # ">= cut - margin" as ">" its next lower float
                cut = np.nextafter(cut - MARGIN * np.abs(cut), -np.inf)
            above = flat_above(np.ascontiguousarray(scores.numpy()), cut)
            query, column = np.divmod(above, scores.shape[1])
            query, column = torch.from_numpy(query), torch.from_numpy(column)
            values = scores.reshape(-1)[torch.from_numpy(above)] if exact is None else exact(query, column)
            blocks.append(self.dense(query, column + first_row, values))
            if sum(block.shape[1] for block, _ in blocks) >= self.k:
                self.merge(*map(partial(torch.cat, dim=1), zip(*blocks, strict=True)))
                blocks = []
        if blocks:
            self.merge(*map(partial(torch.cat, dim=1), zip(*blocks, strict=True)))

    def dense(self, query: Tensor, rows: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Scored documents ``rows`` of queries ``query`` (ascending, rows ascending within a query) as a dense
        (queries, most per query) block of (scores, rows), -inf where a query has fewer; only documents above
        the running k-th score are kept."""
        keep = values > self.scores[query, -1]
        query, rows, values = query[keep], rows[keep], values[keep]
        counts = torch.bincount(query, minlength=len(self.scores))
        slot = torch.arange(len(query)) - (torch.cumsum(counts, 0) - counts)[query]
        width = int(counts.max()) if len(query) else 0
        block = torch.full((len(self.scores), width), -torch.inf, dtype=self.scores.dtype)
        block_rows = torch.full(block.shape, -1, dtype=torch.long)
        block[query, slot], block_rows[query, slot] = values.to(block.dtype), rows
        return block, block_rows

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


def layer_chunks(store: EmbeddingStore, layers: int, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
    """(first row, the layer's stored embeddings) of consecutive document chunks."""
    name = layer_name(layers)
    for start in range(0, store.rows, rows_per_chunk):
        yield start, torch.from_numpy(store.read(name, start, min(start + rows_per_chunk, store.rows)))


def doc_vectors(store: EmbeddingStore, cell: Cell, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
    """(first row, the float cell's unit vectors) of consecutive document chunks."""
    for start, layer in layer_chunks(store, cell.layers, rows_per_chunk):
        yield start, cell_vector({cell.layers: layer}, cell.with_bits(32))


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


def float_top_k(query: Tensor, store: EmbeddingStore, cell: Cell, k: int) -> tuple[Tensor, Tensor]:
    """(scores, rows), each (queries, k), best first: the cosine of the float cell's unit vectors."""
    best = RunningTopK(len(query), min(k, store.rows), torch.float32)
    chunks = doc_vectors(store, cell, chunk_rows(len(query), store.dims[layer_name(cell.layers)]))
    tile = tile_rows(len(query))
    best.add_tiles(
        (start + first, query @ docs[first : first + tile].T, None)
        for start, docs in chunks
        for first in range(0, len(docs), tile)
    )
    return best.scores, best.rows


def tile_rows(queries: int) -> int:
    """Documents per tile: (queries x tile) float32 scores within ``TILE_BYTES``, at least 256."""
    return max(256, TILE_BYTES // (4 * queries))


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
        rows_per_read = chunk_rows(0, store_dim + 2 * cell.dim)
        queries = query_words(query.packed[:, 0])
        for start, docs in doc_codes(store, cell, heads, rows_per_read, HAMMING_ROWS):
            hamming, rows = hamming_top_k(queries, doc_words(docs.packed[:, 0]), best.k, cell.dim)
            inner = torch.from_numpy(cell.dim - 2 * hamming.astype(np.float64))
            best.merge(inner / _norm_products(query, docs.norms[rows]), torch.from_numpy(rows) + start)
        return best.scores, best.rows
    exact_in_float32 = cell.dim * (2**cell.bits - 1) ** 2 < 2**24
    dtype = torch.float32 if exact_in_float32 else torch.float64
    scale = 2.0 ** (2 - 2 * cell.bits)
    query_forms = integer_forms(query, dtype)
    rows_per_chunk = chunk_rows(len(query), store_dim + 2 * cell.bits * cell.dim)

    def tiles() -> Iterator[tuple[int, Tensor, Exact | None]]:
        tile = tile_rows(len(query))
        for start, docs in doc_codes(store, cell, heads, rows_per_chunk, rows_per_chunk):
            forms = integer_forms(docs, dtype)
            for first in range(0, len(docs), tile):
                inner = query_forms @ forms[first : first + tile].T
                norms = _norm_products(query, docs.norms[first : first + tile])
                if not exact_in_float32:
                    yield start + first, inner * scale / norms.double(), None
                    continue

                def exact(q: Tensor, c: Tensor, inner: Tensor = inner, norms: Tensor = norms) -> Tensor:
                    return inner[q, c].double() * scale / norms[q, c].double()

                yield start + first, inner / norms * scale, exact

    best.add_tiles(tiles())
    return best.scores, best.rows
