"""Choose the cell to ship for a budget, from a ``grid.json`` of ``python -m eval grid``.

A cell's quality is its nDCG@10 (the mean over the grid's tasks, or one ``task``), its size its bytes per
vector and its speed its milliseconds per query (``eval.cost``: encoding with early exit plus search, mean
over tasks). A cell is on the **Pareto frontier** of a cost (bytes, or ms per query) when no other cell is
at most as costly and at least as good, and strictly one of the two. ``pick`` keeps the cells within every
given limit and ranks them best quality first, then fewer bytes, then fewer ms per query.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import UserError
from trainer.grid import Cell

MAIN_METRIC = "ndcg_at_10"
COSTS = {"bytes": "bytes_per_vector", "latency": "ms_per_query"}


@dataclass(frozen=True)
class CellRow:
    """One evaluated cell: quality (nDCG@10), bytes per vector, and its speed where the grid measured it."""

    cell: Cell
    quality: float
    bytes_per_vector: float
    ms_per_query: float | None = None
    queries_per_s: float | None = None

    def cost(self, kind: str) -> float:
        return self.bytes_per_vector if kind == "bytes" else self.ms_per_query


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def cell_rows(grid: dict[str, Any], task: str | None = None) -> list[CellRow]:
    """The cells of a grid dict (``grid.json``), scored on ``task`` or on the mean over its tasks."""
    tasks = [t["name"] for t in grid["tasks"]]
    if task is not None and task not in tasks:
        raise UserError(f"--task: {task!r} is not in the grid; its tasks are {tasks}")
    chosen = [task] if task else tasks
    metric = grid.get("main_metric", MAIN_METRIC)
    rows = []
    for entry in grid["cells"]:
        costs = [entry["cost"][t] for t in chosen if t in entry.get("cost", {})]
        rows.append(
            CellRow(
                Cell.parse(entry["cell"]),
                float(np.mean([entry["scores"][t][metric] for t in chosen])),
                float(entry["bytes_per_vector"]),
                _mean([c["ms_per_query"] for c in costs]) if len(costs) == len(chosen) else None,
                _mean([c["queries_per_s"] for c in costs]) if len(costs) == len(chosen) else None,
            )
        )
    return rows


def pareto_front(rows: Sequence[CellRow], cost: Callable[[CellRow], float | None]) -> set[Cell]:
    """The cells no other cell dominates (at most as costly, at least as good, strictly better in one)."""
    measured = [row for row in rows if cost(row) is not None]
    front = set()
    for row in measured:
        dominated = any(
            cost(other) <= cost(row)
            and other.quality >= row.quality
            and (cost(other) < cost(row) or other.quality > row.quality)
            for other in measured
        )
        if not dominated:
            front.add(row.cell)
    return front


def pick(
    rows: Sequence[CellRow],
    max_bytes: float | None = None,
    max_ms_per_query: float | None = None,
    min_quality: float | None = None,
) -> list[CellRow]:
    """The cells within every given limit, best first; UserError saying what is closest when none fits."""
    if max_ms_per_query is not None and any(row.ms_per_query is None for row in rows):
        raise UserError(
            "--max-ms-per-query: this grid.json has no measured speed; rerun `python -m eval grid` to measure it"
        )
    fits = [
        row
        for row in rows
        if (max_bytes is None or row.bytes_per_vector <= max_bytes)
        and (max_ms_per_query is None or row.ms_per_query <= max_ms_per_query)
        and (min_quality is None or row.quality >= min_quality)
    ]
    if not fits:
        limits = [
            f"{name} {value:g}"
            for name, value in (
                ("--max-bytes", max_bytes),
                ("--max-ms-per-query", max_ms_per_query),
                ("--min-ndcg", min_quality),
            )
            if value is not None
        ]
        smallest = min(rows, key=lambda row: (row.bytes_per_vector, -row.quality))
        best = max(rows, key=lambda row: (row.quality, -row.bytes_per_vector))
        raise UserError(
            f"no cell fits {' and '.join(limits)}: the smallest cell is {describe(smallest)}, "
            f"the best is {describe(best)}"
        )
    return sorted(fits, key=lambda row: (-row.quality, row.bytes_per_vector, row.ms_per_query or 0.0))


def describe(row: CellRow) -> str:
    speed = f", {row.ms_per_query:.2f} ms/query" if row.ms_per_query is not None else ""
    return f"{row.cell} ({row.bytes_per_vector:g} bytes, nDCG@10 {row.quality:.4f}{speed})"


def export_command(checkpoint: str, cell: Cell) -> str:
    return f"python -m trainer export {checkpoint} --cell {cell} --out exported/{cell}"


def load_grid(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "grid.json"
    if not path.is_file():
        raise UserError(f"grid: {str(path)!r} does not exist; give the grid.json written by `python -m eval grid`")
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"grid: {path} is not valid JSON ({error})") from None
    if not isinstance(grid, dict) or not grid.get("cells") or not grid.get("tasks"):
        raise UserError(f"grid: {path} has no evaluated cells; give the grid.json written by `python -m eval grid`")
    return grid


def report(
    grid: dict[str, Any],
    max_bytes: float | None = None,
    max_ms_per_query: float | None = None,
    min_quality: float | None = None,
    task: str | None = None,
    top: int = 5,
    checkpoint: str | None = None,
) -> str:
    """The printed answer of ``eval pick``: the best fitting cells, a table, and an export command each."""
    rows = cell_rows(grid, task)
    chosen = pick(rows, max_bytes, max_ms_per_query, min_quality)[:top]
    fronts = {kind: pareto_front(rows, lambda row, kind=kind: row.cost(kind)) for kind in COSTS}
    checkpoint = checkpoint or grid.get("checkpoint") or grid.get("model", "<checkpoint>")
    scope = task or ", ".join(f"{t['name']} ({t['split']})" for t in grid["tasks"])
    lines = [
        f"best {len(chosen)} cells of {grid.get('model', 'the grid')} by nDCG@10 on {scope}"
        + (f", speed measured on {grid['machine']}" if grid.get("machine") else ""),
        "",
        "| rank | cell | nDCG@10 | bytes/vector | ms/query | queries/s | Pareto (bytes, ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank, row in enumerate(chosen, 1):
        ms = f"{row.ms_per_query:.2f}" if row.ms_per_query is not None else "-"
        qps = f"{row.queries_per_s:.0f}" if row.queries_per_s is not None else "-"
        marks = ", ".join("yes" if row.cell in fronts[kind] else "no" for kind in COSTS)
        lines.append(f"| {rank} | {row.cell} | {row.quality:.4f} | {row.bytes_per_vector:g} | {ms} | {qps} | {marks} |")
    lines += ["", "export:"] + [f"  {export_command(checkpoint, row.cell)}" for row in chosen]
    if grid.get("rescore"):
        lines.append(f"note: binary cells were re-ranked by the float query (--rescore {grid['rescore']}).")
    if grid.get("codes") == "sign":
        lines.append(
            "note: binary cells were scored with sign codes; export serves the checkpoint's trained heads, if any."
        )
    return "\n".join(lines)
