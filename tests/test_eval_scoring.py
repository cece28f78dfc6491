"""The grid's metrics in worker processes (eval.scoring): same numbers as in-process, same queries as mteb's."""

from __future__ import annotations

import pytest
from datasets import Dataset
from mteb.abstasks.retrieval import _filter_queries_without_positives  # private, used here only as the reference
from mteb.cache import ResultCache
from test_eval_helpers import make_beir_folder, make_tiny_model

import eval.runner
from eval.runner import GridRequest, cell_meta, run_grid
from eval.scoring import CellScorer, RankedSearch, judged_queries
from eval.search import CorpusRows, ids_of
from eval.tasks import resolve_task, task_texts
from trainer.grid import Cell, Grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root), make_beir_folder(root / "beir")


def test_judged_queries_are_the_queries_mteb_searches(tiny):
    _, beir = tiny
    task, split = resolve_task(f"{beir}:test")
    task_texts(task, split)  # loads the task as the grid does
    data = task.dataset["default"][split]
    unjudged = ids_of(data["queries"])[1]
    data["relevant_docs"][unjudged] = {}
    _, kept = _filter_queries_without_positives(dict(data["relevant_docs"]), data["queries"])
    _, queries = judged_queries(task, split)
    assert queries["id"] == ids_of(kept)
    assert unjudged not in queries["id"] and len(queries["id"]) == len(ids_of(data["queries"])) - 1


def test_ids_of_a_selected_dataset_are_the_selected_rows():
    queries = Dataset.from_dict({"id": ["a", "b", "c", "d"], "text": ["w", "x", "y", "z"]})
    assert ids_of(queries.select([3, 1])) == ["d", "b"]  # mteb selects the judged queries this way
    assert ids_of(queries) == ["a", "b", "c", "d"] and ids_of({"id": [1, 2]}) == ["1", "2"]


def test_ranked_search_answers_only_the_ranking_it_holds():
    search = RankedSearch(cell_meta("m", "r", Cell(1, 8), 0, "trained"), {"q1": {"d1": 0.5}, "q2": {}}, top_k=10)
    assert search.search({"id": ["q2", "q1"]}, top_k=10) == {"q2": {}, "q1": {"d1": 0.5}}
    with pytest.raises(ValueError, match="depth 10; mteb asks for 2 to 100"):
        search.search({"id": ["q1", "q2"]}, top_k=100)
    with pytest.raises(ValueError, match="mteb asks for 1 to 10"):
        search.search({"id": ["q1"]}, top_k=10)


def loaded_task(beir, tmp_path) -> tuple:
    """The tiny BEIR task loaded as the grid loads it, an empty result cache, and a ranking of every judged
    query that returns the first document."""
    task, split = resolve_task(f"{beir}:test")
    task_texts(task, split)
    corpus, queries = judged_queries(task, split)
    first_doc = ids_of(corpus)[0]
    return task, ResultCache(tmp_path / "results"), {q: {first_doc: 1.0} for q in queries["id"]}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_cell_reaches_the_caller_and_earlier_cells_are_kept(tiny, tmp_path, workers):
    task, cache, ranking = loaded_task(tiny[1], tmp_path)
    good = RankedSearch(cell_meta("m", "r", Cell(1, 8), 0, "trained"), ranking, 1000)
    bad = RankedSearch(cell_meta("m", "r", Cell(2, 8), 0, "trained"), {"not a query": {}}, 1000)
    with pytest.raises(ValueError, match="ranked 1 queries"), CellScorer(task, cache, 64, workers) as scorer:
        scorer.submit(good)
        scorer.submit(bad)
    assert cache.load_task_result(task.metadata.name, good.mteb_model_meta) is not None
    assert cache.load_task_result(task.metadata.name, bad.mteb_model_meta) is None


def comparable(scores: dict) -> dict:
    """The scores with NaN (mteb's abstention metrics of a constant column) made equal to itself."""
    return {cell: {k: "nan" if v != v else v for k, v in row.items()} for cell, row in scores.items()}


def test_grid_scores_are_the_same_with_and_without_worker_processes(tiny, tmp_path, monkeypatch):
    checkpoint, beir = tiny
    grid = Grid.from_spec(layers=[1, 3], dims=[8, 32], bits=[1, 2, 32])
    scores = {}
    for workers in (0, 2):
        monkeypatch.setattr(eval.runner, "metric_workers", lambda workers=workers: workers)
        output = tmp_path / f"workers-{workers}"
        scores[workers] = run_grid(GridRequest(str(checkpoint), [f"{beir}:test"], grid, output)).scores["beir"]
        assert len(list((output / "results").rglob("beir.json"))) == 12
    assert comparable(scores[0]) == comparable(scores[2])
    assert len({cell_scores["ndcg_at_10"] for cell_scores in scores[0].values()}) > 1  # cells differ


class FileCountingProgress:
    """A progress bar that records, at each update, how many cells' result files the cache holds."""

    def __init__(self, cache: ResultCache, task_name: str, metas: list) -> None:
        self.cache, self.task_name, self.metas = cache, task_name, metas
        self.written_at_update: list[int] = []

    def update(self, n: int = 1) -> None:
        written = sum(self.cache.load_task_result(self.task_name, meta) is not None for meta in self.metas)
        self.written_at_update.append(written)


@pytest.mark.parametrize("workers", [0, 2])
def test_progress_counts_cells_whose_metrics_are_written(tiny, tmp_path, workers):
    task, cache, ranking = loaded_task(tiny[1], tmp_path)
    metas = [cell_meta("m", "r", Cell(layer, 8), 0, "trained") for layer in (1, 2, 3, 4)]
    progress = FileCountingProgress(cache, task.metadata.name, metas)
    with CellScorer(task, cache, 64, workers, progress) as scorer:
        for meta in metas:
            scorer.submit(RankedSearch(meta, ranking, 1000))
    # one update per cell, each after its file was written (a bar that counted submissions would run ahead)
    assert len(progress.written_at_update) == len(metas)
    assert all(written >= i for i, written in enumerate(progress.written_at_update, start=1))


def test_a_grid_indexes_each_corpus_once(tiny, tmp_path, monkeypatch):
    checkpoint, beir = tiny
    built = []
    original = CorpusRows.of.__func__

    def counting(cls, corpus, embeddings):
        built.append(len(ids_of(corpus)))
        return original(cls, corpus, embeddings)

    monkeypatch.setattr(CorpusRows, "of", classmethod(counting))
    grid = Grid.from_spec(layers=[1, 3], dims=[8, 32], bits=[1, 32])
    monkeypatch.setattr(eval.runner, "metric_workers", lambda: 0)
    scores = run_grid(GridRequest(str(checkpoint), [f"{beir}:test"], grid, tmp_path / "grid")).scores["beir"]
    assert len(scores) == 8 and len(built) == 1  # 8 cells searched and timed, the corpus indexed once
