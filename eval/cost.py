"""What each cell costs to serve on the machine the grid runs on, measured next to its quality.

Per task and layer count ``L``:

- ``queries_per_s`` / ``docs_per_s``: texts per second encoding the task's queries / documents with early
  exit after ``L`` blocks, clocked inside the grid's own encoding pass (``trainer.cell_vectors.ExitClock``:
  tokenisation, the first ``L`` blocks and one layer's share of the pooling, which is what early exit runs),
  after the pass's first, warm-up batch; so pricing every layer costs no encoding of its own. Where that pass
  encoded nothing here (stores reused, or encoded by worker processes on several devices) or only one batch,
  a seeded sample (up to ``SAMPLE`` texts) is encoded once at full depth with the same clock, after one
  untimed warm-up batch.

Per task and cell:

- ``search_ms_per_query``: milliseconds per query to score a seeded sample (up to ``SEARCH_SAMPLE``) of
  queries against the task's whole corpus and keep the best 100, with the grid's own search
  (``eval.search.CellSearch``, so binary cells include encoding the queries' codes and, with ``rescore``,
  the re-ranking); median of ``REPEATS`` runs after one untimed run.
- ``ms_per_query = 1000 / queries_per_s + search_ms_per_query``: serving one query, its encoding amortised
  over a batch.

Bytes per vector is ``Cell.bytes_per_vector``. Measurements are kept in ``<output>/costs.json`` with the
model, machine and batch size they were taken with: a rerun with the same ones reuses them; ``overwrite``
or any change measures again.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer

from eval.embeddings import TaskEmbeddings
from eval.search import RESCORE_K, CellSearch
from eval.tasks import TaskTexts
from trainer.cell_vectors import ExitClock, encode_layers, num_layers
from trainer.grid import Cell

SAMPLE = 256
SEARCH_SAMPLE = 64
REPEATS = 3
COSTS_FILE = "costs.json"


def machine() -> str:
    """The CPU model, the torch thread count and the GPU, if one is used: what the timings depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {torch.get_num_threads()} torch threads, {gpu}"


def _sample(items: list[str], size: int = SAMPLE) -> list[str]:
    return items if len(items) <= size else random.Random(0).sample(items, size)


def sample_clock(model: SentenceTransformer, texts: list[str], batch_size: int, prompt: str | None) -> ExitClock:
    """The exit clock of one full-depth pass over a seeded sample of ``texts``, after an untimed warm-up batch."""
    sample, depth = _sample(texts), num_layers(model)
    encode_layers(model, sample[:batch_size], [depth], batch_size=batch_size, prompt=prompt)  # warm-up
    clock = ExitClock()
    encode_layers(model, sample, [depth], batch_size=batch_size, prompt=prompt, clock=clock)
    return clock


def encoding_costs(
    model: SentenceTransformer,
    texts: TaskTexts,
    layers: list[int],
    batch_size: int,
    prompts: tuple[str | None, str | None],
    clocks: tuple[ExitClock, ExitClock] | None = None,
) -> dict[int, dict[str, float]]:
    """``{L: {"queries_per_s": ..., "docs_per_s": ...}}`` for each layer count, from ``clocks`` (the grid's
    encoding pass of the queries and documents) where they timed texts, else from a sample pass."""
    rates = []
    for role_texts, prompt, clock in zip((texts.queries, texts.docs), prompts, clocks or (None, None), strict=True):
        if clock is None or not clock.texts:
            clock = sample_clock(model, role_texts, batch_size, prompt)
        rates.append(clock.texts_per_second())
    return {layer: {"queries_per_s": rates[0][layer], "docs_per_s": rates[1][layer]} for layer in layers}


def search_ms_per_query(search: CellSearch, embeddings: TaskEmbeddings) -> float:
    """Median milliseconds per query of ``search`` (which holds the task's ``CorpusRows``) over a sample of
    queries against the whole corpus."""
    queries = {"id": _sample(list(embeddings.query_rows), SEARCH_SAMPLE)}
    search.search(queries, top_k=RESCORE_K)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        search.search(queries, top_k=RESCORE_K)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(queries["id"])


class CostStore:
    """``<output>/costs.json``: per task split, the encoding costs per layer count and the search cost per cell
    (keyed by the cell's experiment: ``cell=L3-D128-B1,rescore=4``), for one model, machine and batch size."""

    def __init__(self, output: Path, model: str, batch_size: int, overwrite: bool) -> None:
        self.path = output / COSTS_FILE
        self.identity = {
            "model": model,
            "machine": machine(),
            "batch_size": batch_size,
            "sample": SAMPLE,
            "search_sample": SEARCH_SAMPLE,
        }
        stored = json.loads(self.path.read_text()) if self.path.is_file() and not overwrite else {}
        same = all(stored.get(key) == value for key, value in self.identity.items())
        self.tasks: dict[str, Any] = stored.get("tasks", {}) if same else {}

    @property
    def machine(self) -> str:
        return self.identity["machine"]

    @property
    def batch_size(self) -> int:
        return self.identity["batch_size"]

    def task(self, name: str) -> dict[str, Any]:
        return self.tasks.setdefault(name, {"layers": {}, "cells": {}})

    def unmeasured(self, name: str, cells: dict[str, Cell]) -> list[Cell]:
        """The cells (by experiment key) whose search or layer count has no measurement for task ``name``."""
        costs = self.task(name)
        return [
            cell for key, cell in cells.items() if key not in costs["cells"] or str(cell.layers) not in costs["layers"]
        ]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**self.identity, "tasks": self.tasks}
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(payload, indent=2) + "\n")
        partial.replace(self.path)


def experiment_key(kwargs: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in kwargs.items())


def cell_cost(task_costs: dict[str, Any], cell: Cell, key: str) -> dict[str, float]:
    """The serving cost of one cell on one task, from the stored measurements."""
    encoding = task_costs["layers"][str(cell.layers)]
    search = task_costs["cells"][key]
    return {
        "queries_per_s": encoding["queries_per_s"],
        "docs_per_s": encoding["docs_per_s"],
        "search_ms_per_query": search,
        "ms_per_query": 1000 / encoding["queries_per_s"] + search,
    }


def measure(
    store: CostStore,
    task_name: str,
    model: SentenceTransformer,
    texts: TaskTexts,
    searches: dict[str, CellSearch],
    embeddings: TaskEmbeddings,
    prompts: tuple[str | None, str | None],
) -> None:
    """Measure what ``store`` lacks for this task (layer counts of ``searches``' cells, each search), then save."""
    costs = store.task(task_name)
    layers = sorted({s.cell.layers for s in searches.values()} - {int(layer) for layer in costs["layers"]})
    if layers:
        measured = encoding_costs(model, texts, layers, store.batch_size, prompts, embeddings.clocks)
        costs["layers"].update({str(layer): value for layer, value in measured.items()})
    for key, search in searches.items():
        if key not in costs["cells"]:
            costs["cells"][key] = search_ms_per_query(search, embeddings)
    store.save()
