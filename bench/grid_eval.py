"""Cost of the whole-grid evaluation against plain mteb runs.

Times, with the model already loaded:
(a) one plain ``mteb.evaluate`` of the full model, run before and after (b), mean of the two;
(b) ``eval`` on the whole grid (every layer x dims 32..D x {float, 1-bit}), reports and plots included;
(c) one plain mteb run per cell for a few cells (each a truncated SentenceTransformer), extrapolated to
    the whole grid as ``mean(c) * cells``.
Prints ratios (b)/(a) and (c)/(a) as a markdown row and as JSON. ``--smoke`` runs a 4-cell grid on a
60-document slice of the task in seconds.

    HF_HUB_OFFLINE=1 python bench/grid_eval.py [--smoke] [--model ID] [--task FOLDER:SPLIT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mteb
from sentence_transformers import SentenceTransformer

from bench.common import write_result
from eval.config import DEFAULT_BITS, default_dims
from eval.plots import write_plots
from eval.report import write_reports
from eval.runner import GridRequest, run_grid
from eval.tasks import resolve_task
from trainer.beir import load_split
from trainer.cell_vectors import embedding_dim, keep_layers, num_layers
from trainer.grid import Cell, Grid

DEFAULT_TASK = str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cranfield") + ":test"


def smoke_folder(spec: str, folder: Path, docs: int = 60, queries: int = 10) -> str:
    """A BEIR slice: the first ``queries`` judged queries, their judged documents, padded to ``docs``."""
    source, _, split = spec.partition(":")
    data = load_split(source, split or "test")
    kept = dict(list(data.queries.items())[:queries])
    judged = [d for q in kept for d in data.qrels[q] if d in data.corpus]
    ids = list(dict.fromkeys(judged + list(data.corpus)))[:docs]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    rows = [json.dumps({"_id": i, "title": "", "text": data.corpus[i]}) for i in ids]
    (folder / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(json.dumps({"_id": q, "text": t}) for q, t in kept.items()) + "\n")
    lines = [f"{q}\t{d}\t{s}" for q in kept for d, s in data.qrels[q].items() if d in set(ids)]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
    return f"{folder}:test"


def plain_seconds(model: SentenceTransformer, spec: str, batch_size: int) -> float:
    task, _ = resolve_task(spec)
    start = time.perf_counter()
    mteb.evaluate(model, task, cache=None, show_progress_bar=False, encode_kwargs={"batch_size": batch_size})
    return time.perf_counter() - start


def truncated(model_id: str, cell: Cell) -> SentenceTransformer:
    model = SentenceTransformer(model_id, device="cpu", truncate_dim=cell.dim)
    keep_layers(model, cell.layers)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--smoke", action="store_true", help="a 4-cell grid on a 60-document slice; seconds")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = smoke_folder(args.task, Path(tmp) / "slice") if args.smoke else args.task
        model = SentenceTransformer(args.model, device="cpu")
        depth, width = num_layers(model), embedding_dim(model)
        layers, dims = range(1, depth + 1), default_dims(width)
        if args.smoke:
            layers, dims = sorted({1, depth}), sorted({min(32, width), width})
        grid = Grid.from_spec(layers=layers, dims=dims, bits=DEFAULT_BITS)
        before = plain_seconds(model, spec, args.batch_size)
        start = time.perf_counter()
        request = GridRequest(args.model, [spec], grid, Path(tmp) / "grid", batch_size=args.batch_size)
        results = run_grid(request, model)
        write_reports(results, request.output)
        write_plots(results, request.output)
        whole_grid = time.perf_counter() - start
        full = (before + plain_seconds(model, spec, args.batch_size)) / 2  # bracket the grid: load drifts
        sampled = [Cell(1, min(width, 32)), Cell(max(1, depth // 2), width // 2), Cell(depth, width)]
        per_cell = [plain_seconds(truncated(args.model, c), spec, args.batch_size) for c in sampled]
    cells = len(grid.all_cells())
    mean_cell = sum(per_cell) / len(per_cell)
    row = {
        "model": args.model,
        "task": Path(spec.partition(":")[0]).name + (" (smoke slice)" if args.smoke else ""),
        "cells": cells,
        "full_model_s": round(full, 2),
        "full_model_runs_s": [round(before, 2), round(2 * full - before, 2)],
        "grid_s": round(whole_grid, 2),
        "per_cell_mteb_mean_s": round(mean_cell, 2),
        "grid_over_full": round(whole_grid / full, 3),
        "per_cell_runs_over_full": round(mean_cell * cells / full, 3),
    }
    print("| model | task | cells | (a) full s | (b) grid s | (b)/(a) | (c) per-cell runs / (a) |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {row['model']} | {row['task']} | {cells} | {row['full_model_s']} | {row['grid_s']} | "
        f"{row['grid_over_full']} | {row['per_cell_runs_over_full']} |"
    )
    print(json.dumps(row))
    print(write_result("grid_eval", "python " + " ".join(sys.argv), [row], args.smoke))


if __name__ == "__main__":
    main()
