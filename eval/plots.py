"""A heatmap per task (layers x dims, one panel per bit depth) and a Pareto plot of quality against size."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from eval.report import MAIN_METRIC, bits_label  # noqa: E402
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


def pareto(results: GridResults, path: Path) -> None:
    """nDCG@10 (mean over tasks) against bytes per vector (log scale), one line per layer count."""
    figure, axis = plt.subplots(figsize=(7.5, 5))
    markers = {FLOAT_BITS: "o"}
    for layer in sorted({c.layers for c in results.cells}):
        cells = sorted((c for c in results.cells if c.layers == layer), key=lambda c: (c.bytes_per_vector, c.bits))
        x = [c.bytes_per_vector for c in cells]
        y = [np.mean([results.scores[t][c][MAIN_METRIC] for t in results.tasks]) for c in cells]
        (line,) = axis.plot(x, y, "-", label=f"L{layer}", alpha=0.8)
        for cell, xi, yi in zip(cells, x, y, strict=True):
            axis.plot(xi, yi, markers.get(cell.bits, "^"), color=line.get_color())
    axis.plot([], [], "ko", label="float32 cell")
    axis.plot([], [], "k^", label="binary-code cell")
    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_xlabel("bytes per vector (log scale)")
    axis.set_ylabel("nDCG@10" + (" (mean over tasks)" if len(results.tasks) > 1 else ""))
    axis.set_title(f"{results.model}: quality vs size, {', '.join(results.tasks)}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(title="layers kept", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(results: GridResults, output: Path) -> list[Path]:
    """``heatmap-<task>.png`` per task and ``pareto.png``; returns the paths written."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for task in results.tasks:
        path = output / f"heatmap-{_slug(task)}.png"
        heatmap(results, task, path)
        written.append(path)
    path = output / "pareto.png"
    pareto(results, path)
    return [*written, path]
