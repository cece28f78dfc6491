"""nDCG@10 of every cell during training: a sentence-transformers evaluator for the Trainer.

``CellRetrievalEvaluator`` computes exactly what ``python -m eval grid`` computes for the same weights:
the texts mteb hands a model (``eval.tasks.task_texts``) with the model's mteb prompts, every layer of them
from ONE encoding pass into temporary stores (``eval.embeddings.load_or_encode``, the grid's own encoder,
same batches), each cell's vectors and codes from ``trainer.cell_vectors`` scored by ``eval.search.CellSearch``
and ``eval.scan`` exactly as the grid scores them (cosine for float cells, ``code_scores`` for codes), and
the metric from mteb's own retrieval evaluation (``AbsTaskRetrieval.evaluate``). So a logged value equals
a separate ``eval grid`` of the checkpoint saved at that step.

Metric names follow sentence-transformers' evaluators (``<name>_<metric>``, the Trainer adds ``eval_``)::

    eval_cranfield-test_ndcg@10_L3-D128-B1      one cell at one bit depth (B32 = float)
    eval_cranfield-test_ndcg@10_mean            mean over the scored cells

With several sets, ``ndcg@10_<cell>`` and ``ndcg@10_mean`` are also logged as means over the sets
(``trainer.train.recipe.cell_metric`` names them). ``primary_metric`` is the ``mean`` or the configured
cell; a recipe with ``load_best_model_at_end`` and no ``metric_for_best_model`` selects by it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.types import PromptType
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator

from eval.embeddings import load_or_encode
from eval.pick import MAIN_METRIC
from eval.runner import cell_meta, task_prompt
from eval.search import CellSearch, LayerScans
from eval.tasks import TaskTexts, beir_task, task_texts
from trainer.beir import load_split, write_subset
from trainer.binary.heads import BinaryHeads
from trainer.grid import Cell, Grid
from trainer.train.recipe import Recipe, cell_metric

logger = logging.getLogger(__name__)
SETS_FOLDER = Path("eval") / "sets"


@dataclass
class DevSet:
    """One dev retrieval set: its metric name, its mteb task and split, and the texts mteb hands the model."""

    name: str
    task: AbsTaskRetrieval
    split: str
    texts: TaskTexts


def dev_set(name: str, folder: str | Path, split: str) -> DevSet:
    task = beir_task(folder, split)
    return DevSet(name, task, split, task_texts(task, split))


class CellRetrievalEvaluator(BaseEvaluator):
    """nDCG@10 of every cell of ``grid`` (all its bit depths) on each dev set, from one encoding pass per set.

    ``heads``: the binarization heads being trained (binary cells without them use the parameter-free
    residual sign quantiser, as ``eval grid`` does for a checkpoint without heads).
    """

    def __init__(
        self,
        sets: list[DevSet],
        grid: Grid,
        heads: BinaryHeads | None = None,
        batch_size: int = 64,
        primary: str = "mean",
    ) -> None:
        super().__init__()
        self.sets, self.heads, self.batch_size = sets, heads, batch_size
        self.cells = grid.all_cells()
        self.primary_metric = cell_metric([dev.name for dev in sets], primary)

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        was_training = model.training
        try:
            per_set = {dev.name: self.score_set(model, dev) for dev in self.sets}
        finally:
            model.train(was_training)
        metrics: dict[str, float] = {}
        for name, scores in per_set.items():
            metrics.update({cell_metric([name], str(cell)): value for cell, value in scores.items()})
            metrics[cell_metric([name], "mean")] = float(np.mean(list(scores.values())))
        if len(per_set) > 1:
            names = list(per_set)
            for cell in self.cells:
                metrics[cell_metric(names, str(cell))] = float(np.mean([scores[cell] for scores in per_set.values()]))
            metrics[cell_metric(names, "mean")] = float(
                np.mean([metrics[cell_metric(names, str(c))] for c in self.cells])
            )
        logger.info("cell nDCG@10 at step %s: %s", steps, {k: round(v, 4) for k, v in metrics.items()})
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    def score_set(self, model: SentenceTransformer, dev: DevSet) -> dict[Cell, float]:
        """``{cell: nDCG@10}`` of one dev set: one encoding pass, then mteb's scoring of each cell's ranking."""
        layers = sorted({cell.layers for cell in self.cells})
        prompts = (task_prompt(model, dev.task, PromptType.query), task_prompt(model, dev.task, PromptType.document))
        scores = {}
        with tempfile.TemporaryDirectory(prefix="cell-eval-") as folder:
            embeddings = load_or_encode(
                model, "training", dev.texts, layers, Path(folder) / dev.name, prompts, batch_size=self.batch_size
            )
            scans = LayerScans(self.cells)
            for cell in sorted(self.cells, key=lambda c: c.layers):
                meta = cell_meta("training", "step", cell, 0)
                search = CellSearch(cell, embeddings, meta, heads=self.heads, scans=scans)
                result = dev.task.evaluate(search, dev.split, encode_kwargs={"batch_size": self.batch_size})
                scores[cell] = float(next(iter(result.values()))[MAIN_METRIC])
        return scores

    def get_config_dict(self) -> dict[str, Any]:
        return {"sets": [dev.name for dev in self.sets], "cells": [str(cell) for cell in self.cells]}


def build_evaluator(recipe: Recipe, grid: Grid, full: Cell, heads: BinaryHeads | None) -> CellRetrievalEvaluator:
    """The evaluator of a recipe's ``evaluation`` section; capped sets are written under
    ``<output_dir>/eval/sets/<name>`` (a BEIR folder ``eval grid`` can score)."""
    config = recipe.evaluation
    sets = []
    for spec in config.sets:
        folder = Path(spec.beir)
        if spec.max_queries is not None or spec.max_docs is not None:
            split = load_split(folder, spec.split)
            target = recipe.output_dir / SETS_FOLDER / spec.label
            folder = write_subset(split, spec.split, target, spec.max_queries, spec.max_docs, spec.seed)
        sets.append(dev_set(spec.label, folder, spec.split))
    code_bits = recipe.binary.bits if recipe.binary is not None else []
    cells = config.grid(grid, full, code_bits)
    return CellRetrievalEvaluator(sets, cells, heads, config.batch_size, config.primary_cell(cells))
