"""A heatmap per task (layers x dims, one panel per bit depth) and Pareto plots of quality against size and
against latency."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from eval.pick import cell_rows, pareto_front  # noqa: E402
from eval.report import MAIN_METRIC, bits_label, grid_dict  # noqa: E402
from eval.runner import GridResults  # noqa: E402
from trainer.grid import FLOAT_BITS, Cell  # noqa: E402


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def heatmap(results: GridResults, task: str, path: Path) -> None:
    """nDCG@10 of each (layers, dims) cell, annotated; panels left to right from float to fewest bits."""
    depths = sorted({c.bits for c in results.cells}, reverse=True)
    layers = sorted({c.layers for c in results.cells})
    dims = sorted({c.dim for c in results.cells})
    scores = results.scores[task]
    figure, axes = plt.subplots(
        1, len(depths), figsize=(1.2 + 1.1 * len(dims) * len(depths), 1.4 + 0.5 * len(layers)), squeeze=False
    )
    for axis, bits in zip(axes[0], depths, strict=True):
        grid = np.full((len(layers), len(dims)), np.nan)
        for i, layer in enumerate(layers):
            for j, dim in enumerate(dims):
                cell = Cell(layer, dim, bits)
                if cell in scores:
                    grid[i, j] = scores[cell][MAIN_METRIC]
        image = axis.imshow(
            grid, cmap="viridis", vmin=0, vmax=max(np.nanmax(grid), 1e-6), aspect="auto", origin="lower"
        )
        for i in range(len(layers)):
            for j in range(len(dims)):
                if not np.isnan(grid[i, j]):
                    axis.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
        axis.set_xticks(range(len(dims)), [str(d) for d in dims])
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set_xlabel("dimensions kept")
        axis.set_ylabel("transformer layers kept")
        axis.set_title(f"{bits_label(bits)} (B{bits})")
        figure.colorbar(image, ax=axis, label="nDCG@10")
    figure.suptitle(f"{results.model} on {task} ({results.tasks[task]}): nDCG@10 per cell")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


AXES = {
    "bytes": ("bytes per vector (log scale)", "size", "pareto.png"),
    "latency": ("ms per query: encoding with early exit + search (log scale)", "latency", "pareto-latency.png"),
}


def pareto(grid: dict[str, Any], kind: str, path: Path) -> None:
    """nDCG@10 (mean over tasks) against bytes per vector or ms per query, one series per bit depth (float32
    and each code depth), the Pareto frontier drawn as a step line through its cells, which are labelled."""
    rows = [row for row in cell_rows(grid) if row.cost(kind) is not None]
    front = pareto_front(rows, lambda row: row.cost(kind))
    figure, axis = plt.subplots(figsize=(8, 5.5))
    for bits in sorted({row.cell.bits for row in rows}, reverse=True):
        series = [row for row in rows if row.cell.bits == bits]
        axis.scatter(
            [row.cost(kind) for row in series],
            [row.quality for row in series],
            marker="o" if bits == FLOAT_BITS else "^",
            label=f"{bits_label(bits)} (B{bits})",
            alpha=0.8,
        )
    frontier = sorted((row for row in rows if row.cell in front), key=lambda row: (row.cost(kind), row.quality))
    axis.step(
        [row.cost(kind) for row in frontier],
        [row.quality for row in frontier],
        where="post",
        color="black",
        linewidth=1,
        label="Pareto frontier",
    )
    points: dict[tuple[float, float], list[str]] = {}  # equal cells (e.g. same code at two depths) share a label
    for row in frontier:
        points.setdefault((row.cost(kind), row.quality), []).append(str(row.cell))
    for (x, y), names in points.items():
        axis.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    label, what, _ = AXES[kind]
    axis.set_xscale("log", base=2 if kind == "bytes" else 10)
    axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g" if kind == "latency" else ""))
    axis.set_xlabel(label)
    tasks = [t["name"] for t in grid["tasks"]]
    axis.set_ylabel("nDCG@10" + (" (mean over tasks)" if len(tasks) > 1 else ""))
    measured = f"\nmeasured on {grid['machine']}" if kind == "latency" and grid.get("machine") else ""
    axis.set_title(f"{grid['model']}: quality vs {what}, {', '.join(tasks)}{measured}", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(results: GridResults, output: Path) -> list[Path]:
    """``heatmap-<task>.png`` per task, ``pareto.png`` (quality vs bytes) and, when speed was measured,
    ``pareto-latency.png`` (quality vs ms per query); returns the paths written."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for task in results.tasks:
        path = output / f"heatmap-{_slug(task)}.png"
        heatmap(results, task, path)
        written.append(path)
    grid = grid_dict(results)
    for kind, (_, _, name) in AXES.items():
        if kind == "bytes" or all("cost" in entry for entry in grid["cells"]):
            pareto(grid, kind, output / name)
            written.append(output / name)
    return written
