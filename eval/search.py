"""One cell as an mteb ``SearchProtocol`` model that scores pre-computed vectors (no encoder call).

mteb hands ``index`` the corpus and ``search`` the queries; rows are looked up by id in the cached
embeddings, so mteb's own retrieval evaluator computes every metric from this cell's ranking.

Scores:
- float cell: cosine, ``s(q, d) = <q, d>`` of the unit-normalised ``cell.dim`` prefixes;
- binary cell: the project's one code score, ``trainer.binary.codes.code_scores``: the cosine of the codes'
  float forms from popcounts on the packed planes (for 1 bit it ranks exactly like Hamming distance);
- binary with ``rescore = M``: the top ``k * M`` documents by code score (``k = RESCORE_K = 100``, the
  deepest headline metric, recall@100), re-ranked by the float query against the documents' decoded codes
  ``<q, e_d>`` (sentence-transformers' and BPR's rescoring).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mteb.models.model_meta import ModelMeta
from torch import Tensor

from eval.embeddings import LayerEmbeddings
from trainer.binary.codes import PackedCodes, code_scores
from trainer.cell_vectors import cell_codes, cell_vector
from trainer.grid import Cell

RESCORE_K = 100


def _rows(ids: list[str], wanted: list[str]) -> list[int]:
    position = {item: i for i, item in enumerate(ids)}
    return [position[str(item)] for item in wanted]


def ids_of(rows: Any) -> list[str]:
    """The ``id`` column of an mteb corpus/queries Dataset (read from Arrow at once) or a plain mapping."""
    column = rows.data.column("id").to_pylist() if hasattr(rows, "data") else rows["id"]
    return [str(i) for i in column]


def best_k(scores: np.ndarray, doc_ids: list[str], query_ids: list[str], k: int) -> dict[str, dict[str, float]]:
    """The ``k`` best documents per query: ``{query id: {doc id: score}}``."""
    k = min(k, scores.shape[1])
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, best, axis=1).tolist()
    return {
        qid: dict(zip([doc_ids[j] for j in best[i].tolist()], values[i], strict=True))
        for i, qid in enumerate(query_ids)
    }


class CellSearch:
    """Retrieval with one cell's vectors; ``meta`` names the cell as an mteb experiment."""

    def __init__(
        self, cell: Cell, embeddings: LayerEmbeddings, meta: ModelMeta, heads: Any | None = None, rescore: int = 0
    ) -> None:
        self.cell = cell
        self.embeddings = embeddings
        self.mteb_model_meta = meta
        self.heads = heads
        self.rescore = rescore
        self._doc_ids: list[str] = []
        self._doc_float: Tensor | None = None
        self._doc_codes: PackedCodes | None = None

    def _float(self, role: dict[int, Tensor], rows: list[int]) -> Tensor:
        return cell_vector({self.cell.layers: role[self.cell.layers][rows]}, self.cell.with_bits(32))

    def index(self, corpus: Any, **kwargs: Any) -> None:
        self._doc_ids = ids_of(corpus)
        docs = self._float(self.embeddings.docs, _rows(self.embeddings.doc_ids, self._doc_ids))
        if self.cell.is_float:
            self._doc_float = docs
        else:
            self._doc_codes = cell_codes(docs, self.cell, self.heads)

    def search(self, queries: Any, *, top_k: int, **kwargs: Any) -> dict[str, dict[str, float]]:
        query_ids = ids_of(queries)
        query = self._float(self.embeddings.queries, _rows(self.embeddings.query_ids, query_ids))
        if self.cell.is_float:
            scores = (query @ self._doc_float.T).numpy()
            return best_k(scores, self._doc_ids, query_ids, top_k)
        scores = code_scores(cell_codes(query, self.cell, self.heads), self._doc_codes)
        if not self.rescore:
            return best_k(scores, self._doc_ids, query_ids, top_k)
        return self._rescored(query.numpy().astype(np.float64), scores, query_ids)

    def _rescored(self, query: np.ndarray, scores: np.ndarray, query_ids: list[str]) -> dict[str, dict[str, float]]:
        """The top ``RESCORE_K * rescore`` documents by code score, re-scored ``<q, e_d>`` with ``e_d`` decoded.

        Only these candidates are returned, so metrics deeper than ``RESCORE_K * rescore`` see a shorter list.
        """
        candidates = min(RESCORE_K * self.rescore, scores.shape[1])
        best = np.argpartition(-scores, candidates - 1, axis=1)[:, :candidates]
        decoded = self._doc_codes.to_float()
        results = {}
        for i, qid in enumerate(query_ids):
            rescored = (decoded[best[i]] @ query[i]).tolist()
            results[qid] = dict(zip([self._doc_ids[j] for j in best[i].tolist()], rescored, strict=True))
        return results
