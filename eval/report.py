"""``grid.json`` (quality, cost and Pareto frontier per cell) and one markdown table per bit depth (rows: layers,
columns: dims, cells: nDCG@10)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.pick import COSTS, MAIN_METRIC, cell_rows, pareto_front
from eval.runner import GridResults
from eval.search import RESCORE_K
from trainer.grid import FLOAT_BITS, Cell


def grid_dict(results: GridResults) -> dict[str, Any]:
    """Every cell with its layers, dim, bits, bytes per vector, per task every numeric mteb metric and what it
    costs to serve (``eval.cost``), and whether it is on the Pareto frontier of quality against bytes and
    against ms per query (``eval.pick``)."""
    cells = []
    for cell in results.cells:
        scores = {
            task: {k: v for k, v in results.scores[task][cell].items() if isinstance(v, (int, float))}
            for task in results.tasks
        }
        entry = {
            "cell": str(cell),
            "layers": cell.layers,
            "dim": cell.dim,
            "bits": cell.bits,
            "bytes_per_vector": cell.bytes_per_vector,
            "scores": scores,
        }
        if all(cell in results.costs.get(task, {}) for task in results.tasks):
            entry["cost"] = {task: results.costs[task][cell] for task in results.tasks}
        cells.append(entry)
    grid = {
        "model": results.model,
        "checkpoint": results.checkpoint,
        "revision": results.revision,
        "num_layers": results.num_layers,
        "embedding_dim": results.embedding_dim,
        "rescore": results.rescore,
        "codes": results.codes,
        "main_metric": MAIN_METRIC,
        "machine": results.machine,
        "tasks": [{"name": name, "split": split} for name, split in results.tasks.items()],
        "cells": cells,
    }
    rows = cell_rows(grid)
    fronts = {kind: pareto_front(rows, lambda row, kind=kind: row.cost(kind)) for kind in COSTS}
    for entry, row in zip(cells, rows, strict=True):
        entry["pareto"] = {kind: row.cell in front for kind, front in fronts.items()}
    return grid


def bits_label(bits: int) -> str:
    return "float32" if bits == FLOAT_BITS else f"{bits}-bit codes"


def markdown_table(results: GridResults, bits: int) -> str:
    """One layers x dims table of nDCG@10 per task for the cells of depth ``bits`` (blank: cell not in grid)."""
    cells = [c for c in results.cells if c.bits == bits]
    layers = sorted({c.layers for c in cells})
    dims = sorted({c.dim for c in cells})
    rescored = ""
    if results.rescore and bits != FLOAT_BITS:
        rescored = f", top {RESCORE_K * results.rescore} by code re-scored by the float query"
    lines = [f"# {results.model}: nDCG@10, {bits_label(bits)} (B{bits}){rescored}", ""]
    for task, split in results.tasks.items():
        lines += [f"## {task} ({split})", "", "| layers \\ dims | " + " | ".join(str(d) for d in dims) + " |"]
        lines.append("|---|" + "---|" * len(dims))
        for layer in layers:
            row = []
            for dim in dims:
                cell = Cell(layer, dim, bits)
                row.append(f"{results.scores[task][cell][MAIN_METRIC]:.4f}" if cell in cells else "")
            lines.append(f"| L{layer} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_reports(results: GridResults, output: Path) -> list[Path]:
    """Write grid.json and ``table-B<bits>.md`` per depth; returns the paths written."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "grid.json"
    path.write_text(json.dumps(grid_dict(results), indent=2) + "\n", encoding="utf-8")
    written = [path]
    for bits in sorted({c.bits for c in results.cells}, reverse=True):
        table = output / f"table-B{bits}.md"
        table.write_text(markdown_table(results, bits), encoding="utf-8")
        written.append(table)
    return written
