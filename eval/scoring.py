"""mteb's metrics of a grid's cells, computed in worker processes while this process searches the next cells.

Each cell is searched here (``CellSearch``: the layer scans share work, the stores stay open here) on the
queries mteb will ask for, and its ranking goes to ``mteb.evaluate`` as a ``RankedSearch`` in a forked worker.
mteb's per-cell metric code (pytrec_eval, MRR, the abstention curves: about 0.35 s per cranfield cell) holds
the GIL and costs more than the searches, so a 60-cell grid spends most of its scoring time there; workers
share it out over the machine's cores. Workers are forked once the task is loaded, so they inherit the task
and the result cache, and only rankings travel to them. At most one ranking waits for a free worker, so
memory stays bounded on large tasks. Where fork is unavailable (Windows, macOS) or there is a single
core, the metrics are computed here, one cell after another.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import mteb
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.cache import ResultCache
from mteb.models.model_meta import ModelMeta
from tqdm.auto import tqdm

from eval.search import CellSearch, ids_of


class RankedSearch:
    """An mteb ``SearchProtocol`` model that answers with a ranking computed beforehand: ``ranking`` is
    ``{query id: {doc id: score}}`` of the ``top_k`` best documents of exactly the queries mteb asks for
    (anything else is an error: the ranking must be the one mteb's own search would have produced)."""

    def __init__(self, meta: ModelMeta, ranking: dict[str, dict[str, float]], top_k: int) -> None:
        self.mteb_model_meta = meta
        self.ranking = ranking
        self.top_k = top_k

    def index(self, corpus: Any, **kwargs: Any) -> None:
        """Nothing to index: the ranking is already computed."""

    def search(self, queries: Any, *, top_k: int, **kwargs: Any) -> dict[str, dict[str, float]]:
        query_ids = ids_of(queries)
        if top_k != self.top_k or self.ranking.keys() != set(query_ids):
            asked = f"mteb asks for {len(query_ids)} to {top_k}"
            raise ValueError(f"ranked {len(self.ranking)} queries to depth {self.top_k}; {asked}")
        return {qid: self.ranking[qid] for qid in query_ids}


def judged_queries(task: AbsTaskRetrieval, split: str) -> tuple[Any, Any]:
    """(corpus, queries) of the task's one subset as mteb's retrieval evaluator sees them: only queries with
    at least one relevance judgement (mteb drops the others before searching)."""
    (data,) = (subset[split] for subset in task.dataset.values())
    judged = {str(qid) for qid, docs in data["relevant_docs"].items() if docs}
    return data["corpus"], {"id": [qid for qid in ids_of(data["queries"]) if qid in judged]}


def ranked(search: CellSearch, task: AbsTaskRetrieval, split: str) -> RankedSearch:
    """The cell's ranking of the task's judged queries, at the depth mteb asks (its largest k); ``search`` holds
    the task's ``CorpusRows`` (the grid indexes each corpus once and shares it)."""
    _, queries = judged_queries(task, split)
    top_k = max(task.k_values)
    return RankedSearch(search.mteb_model_meta, search.search(queries, top_k=top_k), top_k)


def metric_workers() -> int:
    """Processes for the metrics: one per usable core where fork is safe to use (Linux), else 0 (in-process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return cores if cores > 1 and sys.platform == "linux" else 0


def _evaluate(search: RankedSearch, task: AbsTaskRetrieval, cache: ResultCache, batch_size: int) -> None:
    mteb.evaluate(
        search,
        task,
        cache=cache,
        overwrite_strategy="always",  # only missing or stale cells reach this point
        show_progress_bar=False,
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
    )


_worker_job: tuple = ()  # a worker's (task, cache, batch size), set at its start


def _start_worker(*job: object) -> None:
    """A worker keeps the job it inherited and leaves Ctrl-C to the main process, which waits for the cells it
    already handed out."""
    global _worker_job
    _worker_job = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _evaluate_in_worker(search: RankedSearch) -> None:
    _evaluate(search, *_worker_job)


class CellScorer:
    """Writes each submitted cell's mteb result file (``submit``), in ``workers`` forked processes (0: here),
    and advances ``progress`` as each file is written. Use as a context manager: leaving it waits for every
    submitted cell and re-raises a worker's error."""

    def __init__(
        self, task: AbsTaskRetrieval, cache: ResultCache, batch_size: int, workers: int, progress: tqdm | None = None
    ) -> None:
        self.job = (task, cache, batch_size)
        self.pool: Pool | None = None
        self.pending: deque[AsyncResult] = deque()
        self.workers = workers
        self.progress = progress
        if workers:
            self.pool = multiprocessing.get_context("fork").Pool(workers, _start_worker, self.job)

    def submit(self, search: RankedSearch) -> None:
        if self.pool is None:
            _evaluate(search, *self.job)
            self._scored()
            return
        while len(self.pending) > self.workers:  # every worker busy and one ranking waiting, no more
            self.pending.popleft().get()
        self.pending.append(self.pool.apply_async(_evaluate_in_worker, (search,), callback=self._scored))

    def _scored(self, _: object = None) -> None:
        """One more cell's result file is written (called in the pool's result thread for workers)."""
        if self.progress is not None:
            self.progress.update()

    def __enter__(self) -> CellScorer:
        return self

    def __exit__(self, *error: object) -> None:
        """Wait for every submitted cell, also when the caller stops on an error or an interrupt: a searched
        cell's result file is still written. A failing worker stops the others."""
        try:
            while self.pending:
                self.pending.popleft().get()
        except BaseException:
            if self.pool is not None:
                self.pool.terminate()
            raise
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool.join()
