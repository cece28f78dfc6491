"""One cell as an mteb ``SearchProtocol`` model that scores pre-computed vectors (no encoder call).

mteb hands ``index`` the corpus and ``search`` the queries; their rows are looked up by id in the task's
stores (``eval.embeddings``), and the documents are scanned chunk by chunk (``eval.scan``), so mteb's own
retrieval evaluator computes every metric from this cell's ranking while memory stays bounded by one chunk.

Scores:
- float cell: cosine, ``s(q, d) = <q, d>`` of the unit-normalised ``cell.dim`` prefixes (a grid scores all the
  float dims of a layer in one scan, ``LayerScans``);
- binary cell: the project's one code score, ``trainer.binary.codes.code_scores``: the cosine of the codes'
  float forms (for 1 bit it ranks exactly like Hamming distance);
- binary with ``rescore = M``: the top ``k * M`` documents by code score (``k = RESCORE_K = 100``, the
  deepest headline metric, recall@100), re-ranked by the float query against the documents' decoded codes
  ``<q, e_d>`` (sentence-transformers' and BPR's rescoring). The candidates' codes are re-derived from their
  float vectors, the only rows read from the store for it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mteb.models.model_meta import ModelMeta
from torch import Tensor

from eval.embeddings import TaskEmbeddings
from eval.scan import code_top_k, float_top_k
from trainer.cell_vectors import cell_codes, cell_vector, layer_name
from trainer.grid import Cell
from trainer.store import EmbeddingStore

RESCORE_K = 100


def ids_of(rows: Any) -> list[str]:
    """The ``id`` column of an mteb corpus/queries Dataset (read from Arrow at once, after any ``select`` mteb
    made, such as dropping unjudged queries) or a plain mapping."""
    column = rows.with_format("arrow")["id"].to_pylist() if hasattr(rows, "with_format") else rows["id"]
    return [str(i) for i in column]


class LayerScans:
    """A grid's float cells scored a layer at a time (``eval.scan.float_top_k``): the first float cell of a layer
    that is searched scans every float dim of ``cells`` at that layer at once, and the other dims' results wait
    until their cells are searched with the same queries and ``k`` (each is handed out once). Only the results
    of the layer scanned last are kept, so search the cells layer by layer."""

    def __init__(self, cells: Iterable[Cell]) -> None:
        self.dims: dict[int, set[int]] = {}
        for cell in cells:
            if cell.is_float:
                self.dims.setdefault(cell.layers, set()).add(cell.dim)
        self.waiting: dict[int, tuple[Hashable, tuple[Tensor, Tensor]]] = {}  # dim -> (what was asked, result)

    def top_k(self, query: Tensor, docs: EmbeddingStore, cell: Cell, k: int, asked: Hashable) -> tuple[Tensor, Tensor]:
        """(scores, rows) of float ``cell`` for ``query`` (the layer's stored rows), ``asked`` naming the queries."""
        key = (cell.layers, asked, k)
        waiting = self.waiting.pop(cell.dim, None)
        if waiting is not None and waiting[0] == key:
            return waiting[1]
        results = float_top_k(query, docs, cell.layers, self.dims.get(cell.layers, set()) | {cell.dim}, k)
        self.waiting = {dim: (key, result) for dim, result in results.items() if dim != cell.dim}
        return results[cell.dim]


@dataclass(frozen=True)
class CorpusRows:
    """The documents each row of a task's document store stands for: ``first_id[row]``, and ``more_ids[row]``
    for rows shared by several documents with the same text (a store holds each distinct text once)."""

    first_id: list[str]
    more_ids: dict[int, list[str]]

    @classmethod
    def of(cls, corpus: Any, embeddings: TaskEmbeddings) -> CorpusRows:
        """The rows of ``corpus`` (an mteb corpus or ``{"id": [...]}``), which must cover every stored row."""
        first: list[str | None] = [None] * embeddings.docs.rows
        more: dict[int, list[str]] = {}
        for doc_id in ids_of(corpus):
            row = embeddings.doc_rows[doc_id]
            if first[row] is None:
                first[row] = doc_id
            else:
                more.setdefault(row, []).append(doc_id)
        if None in first:
            raise ValueError("the corpus to index lacks documents whose embeddings the store holds")
        return cls(first, more)


class CellSearch:
    """Retrieval with one cell's vectors; ``meta`` names the cell as an mteb experiment. Float cells of a grid
    share ``scans`` (``LayerScans``); without it a float cell is scanned alone (what serving it costs). A grid's
    cells also share the task's ``rows`` (``CorpusRows``), so its corpus is indexed once, not once per cell;
    without them ``index`` builds them."""

    def __init__(
        self,
        cell: Cell,
        embeddings: TaskEmbeddings,
        meta: ModelMeta,
        heads: Any | None = None,
        rescore: int = 0,
        scans: LayerScans | None = None,
        rows: CorpusRows | None = None,
    ) -> None:
        self.cell = cell
        self.embeddings = embeddings
        self.mteb_model_meta = meta
        self.heads = heads
        self.rescore = rescore
        self.scans = scans if scans is not None else LayerScans([cell])
        self.rows = rows

    def index(self, corpus: Any, **kwargs: Any) -> None:
        self.rows = CorpusRows.of(corpus, self.embeddings)

    def search(self, queries: Any, *, top_k: int, **kwargs: Any) -> dict[str, dict[str, float]]:
        query_ids = ids_of(queries)
        layer = torch.from_numpy(self.embeddings.query_vectors(self.cell.layers, query_ids))
        docs = self.embeddings.docs
        if self.cell.is_float:
            scores, rows = self.scans.top_k(layer, docs, self.cell, top_k, tuple(query_ids))
            return self._results(query_ids, scores, rows, top_k)
        query = cell_vector({self.cell.layers: layer}, self.cell.with_bits(32))
        depth = RESCORE_K * self.rescore if self.rescore else top_k
        scores, rows = code_top_k(cell_codes(query, self.cell, self.heads), docs, self.cell, self.heads, depth)
        if not self.rescore:
            return self._results(query_ids, scores, rows, top_k)
        return self._rescored(query.numpy().astype(np.float64), query_ids, scores, rows, depth)

    def _hits(self, scores: Tensor, rows: Tensor, k: int) -> list[tuple[list[str], list[int], list[float]]]:
        """Per query, its ``k`` best (doc ids, rows, scores), best first: a row stands for every document with
        its text, so rows shared by several documents are expanded (rows are distinct texts)."""
        if self.rows is None:
            raise RuntimeError("search() before index(): the cell does not know which documents its rows are")
        first_id, more_ids = self.rows.first_id, self.rows.more_ids
        hits = []
        for row_list, score_list in zip(rows.tolist(), scores.tolist(), strict=True):
            if more_ids.keys().isdisjoint(row_list):
                hits.append(([first_id[row] for row in row_list], row_list, score_list))
                continue
            expanded = [
                (doc_id, row, score)
                for row, score in zip(row_list, score_list, strict=True)
                for doc_id in (first_id[row], *more_ids.get(row, ()))
            ][:k]
            hits.append(tuple(map(list, zip(*expanded, strict=True))))
        return hits

    def _results(self, query_ids: list[str], scores: Tensor, rows: Tensor, k: int) -> dict[str, dict[str, float]]:
        """``{query id: {doc id: score}}`` of the ``k`` best documents per query."""
        hits = self._hits(scores, rows, k)
        return {qid: dict(zip(ids, values, strict=True)) for qid, (ids, _, values) in zip(query_ids, hits, strict=True)}

    def _rescored(
        self, query: np.ndarray, query_ids: list[str], scores: Tensor, rows: Tensor, depth: int
    ) -> dict[str, dict[str, float]]:
        """The top ``depth = RESCORE_K * rescore`` documents by code score, re-scored ``<q, e_d>`` with ``e_d``
        decoded from codes re-derived from the candidates' float vectors (read from the store, nothing else).

        Only these candidates are returned, so metrics deeper than ``depth`` see a shorter list.
        """
        hits = self._hits(scores, rows, depth)
        candidates = np.unique(np.concatenate([np.asarray(row_list) for _, row_list, _ in hits]))
        position = {row: i for i, row in enumerate(candidates.tolist())}
        layer = torch.from_numpy(self.embeddings.docs.take(layer_name(self.cell.layers), candidates))
        vectors = cell_vector({self.cell.layers: layer}, self.cell.with_bits(32))
        decoded = cell_codes(vectors, self.cell, self.heads).to_float()
        results = {}
        for i, (qid, (ids, row_list, _)) in enumerate(zip(query_ids, hits, strict=True)):
            rescored = (decoded[[position[row] for row in row_list]] @ query[i]).tolist()
            results[qid] = dict(zip(ids, rescored, strict=True))
        return results
