"""Grid scoring at MTEB scale: 60 cells over an on-disk store of a synthetic corpus; time, GB/s, peak memory.

A synthetic corpus with all-MiniLM-L6-v2's shapes (random unit vectors, 6 layers x 384 dims, a float16 store
written chunk by chunk by ``trainer.store``; the encoder is not the subject) and 1,000 random unit queries go
through the grid's scoring (``eval.scan``: ``float_top_k`` / ``code_top_k``, top 1,000 per query as mteb asks)
for 60 cells: layers 1, 2, 4, 6 x dims 32, 64, 128, 256, 384 x {B32, B1, B2} (sign / residual sign codes).

Per cell: seconds; GB/s scanned = queries x documents x bytes per vector / seconds (the definition of
BENCHMARKS.md section 3: float32 cells 4 bytes per dim, codes bits / 8); for matrix-product cells (B32, B2)
GFLOP/s and their share of the machine's matrix-multiply throughput measured in the same run on the same shapes
((queries x d) @ (d x 65,536) float32, as one product or in the scan's cache-sized chunks, whichever is faster:
``matmul GFLOP/s``); peak resident memory of the process during the cell (``VmHWM``, reset before each cell;
the store is read with file reads, never mapped, so it is not in it). Before timing, one cell per bit depth is
scored on a small store, so the kernels' one-time compilation (numba) is not timed, and every layer of the store
is read once (timed apart: ``first read of every layer s``), so the first cell of a layer does not also pay the
disk read of the whole layer. Float cells are timed twice: each cell alone (what serving that one cell costs:
``float_top_k`` with its one dim) and each layer's dims in one scan (what the grid does: ``float_top_k`` with
every dim, rows ``L<l>-D32..D384-B32``), whose ``of matmul`` is the time the machine's matrix product takes for
the products of those cells one by one over the scan's time, and whose ``GFLOP/s executed`` counts the product
the scan really computes (the widest dim's: nested dims share their products). Also: the peak over all cells
minus the resident memory before scoring, a 4096^3
float32 product, and one cell through ``CellSearch.search`` (the mteb result dicts included). The documents
count grows by size; the sizes run largest first, each in a fresh process, so every peak is its own.

    python bench/grid_scale.py                  # 1M and 200k documents (the 1M store is 4.6 GB on disk)
    python bench/grid_scale.py --docs 200000    # one size
    python bench/grid_scale.py --smoke          # seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import markdown, write_result
from eval.embeddings import TaskEmbeddings
from eval.runner import cell_meta
from eval.scan import chunk_rows, code_top_k, float_top_k, layer_chunks
from eval.search import CellSearch
from trainer.cell_vectors import cell_codes, cell_vector, layer_name
from trainer.grid import Cell, Grid
from trainer.store import EmbeddingStore, StoreWriter

LAYERS, WIDTH = 6, 384  # all-MiniLM-L6-v2
REFERENCE_ROWS = 65536  # documents of the reference matrix products


def peak_mib(reset: bool = False) -> float:
    """The process's peak resident memory (VmHWM) in MiB; ``reset`` starts a new peak (Linux clear_refs 5)."""
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_store(folder: Path, docs: int, chunk: int = 16384) -> EmbeddingStore:
    """``docs`` random unit vectors per layer, written chunk by chunk as a float16 store."""
    rng = np.random.default_rng(0)
    dims = {layer_name(layer): WIDTH for layer in range(1, LAYERS + 1)}
    writer = StoreWriter(folder, "synthetic", docs, dims, "float16", chunk)
    writer.create_files()
    for index in range(writer.chunks):
        rows = min(chunk, docs - index * chunk)
        writer.write(index, {name: unit_rows(rng, rows, WIDTH) for name in dims})
    return writer.finish()


def matmul_gflops(queries: int, dim: int, rows: int, tile: int | None = None, repeats: int = 3) -> float:
    """Median GFLOP/s of float32 (queries x dim) @ (dim x rows) products, ``tile`` columns at a time (default:
    one product): the machine's matmul throughput on that shape."""
    a, b = torch.randn(queries, dim), torch.randn(rows, dim)
    tile = tile or rows
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for first in range(0, rows, tile):
            a @ b[first : first + tile].T
        times.append(time.perf_counter() - start)
    return 2 * queries * dim * rows / float(np.median(times[1:])) / 1e9


def score(cell: Cell, queries: torch.Tensor, store: EmbeddingStore, k: int) -> float:
    """Seconds to score one cell alone (query codes included): what serving that one cell costs."""
    start = time.perf_counter()
    if cell.is_float:
        float_top_k(queries, store, cell.layers, [cell.dim], k)
    else:
        code_top_k(cell_codes(cell_vector({cell.layers: queries}, cell), cell, None), store, cell, None, k)
    return time.perf_counter() - start


def score_layer(layer: int, dims: list[int], queries: torch.Tensor, store: EmbeddingStore, k: int) -> float:
    """Seconds to score every float dim of one layer the grid's way: one scan for all of them."""
    start = time.perf_counter()
    float_top_k(queries, store, layer, dims, k)
    return time.perf_counter() - start


def query_store(folder: Path, query_layers: dict[int, torch.Tensor]) -> EmbeddingStore:
    queries = len(query_layers[1])
    writer = StoreWriter(
        folder, "queries", queries, {layer_name(layer): WIDTH for layer in query_layers}, "float32", queries
    )
    writer.create_files()
    writer.write(0, {layer_name(layer): matrix.numpy() for layer, matrix in query_layers.items()})
    return writer.finish()


def mteb_search_seconds(docs: EmbeddingStore, queries: EmbeddingStore, cell: Cell, k: int) -> float:
    """One cell through ``CellSearch`` (index + search), which also builds mteb's {query: {doc: score}} dicts."""
    query_rows = {f"q{i}": i for i in range(queries.rows)}
    doc_rows = {f"d{i}": i for i in range(docs.rows)}
    search = CellSearch(cell, TaskEmbeddings(queries, docs, query_rows, doc_rows), cell_meta("synthetic", "r", cell, 0))
    start = time.perf_counter()
    search.index({"id": list(doc_rows)})
    search.search({"id": list(query_rows)}, top_k=k)
    return time.perf_counter() - start


def one_size(docs: int, queries: int, grid: Grid, k: int, workdir: Path) -> list[dict]:
    """Build the store of ``docs`` documents, score every cell, return one row per cell and a summary row."""
    build_start = time.perf_counter()
    store = synthetic_store(workdir / "docs", docs)
    build_s = time.perf_counter() - build_start
    rng = np.random.default_rng(1)
    query_layers = {layer: torch.from_numpy(unit_rows(rng, queries, WIDTH)) for layer in range(1, LAYERS + 1)}
    # one cell per bit depth on a small store first: the kernels' one-time compilation is not timed
    warm_up = synthetic_store(workdir / "warm-up", 4096)
    for bits in grid.bits:
        score(Cell(1, grid.dims[0], bits), query_layers[1], warm_up, k)
    chunk = chunk_rows(queries, WIDTH)
    # the faster of one product and the scan's cache-sized chunks: the throughput the scan could reach
    reference = {
        dim: max(matmul_gflops(queries, dim, REFERENCE_ROWS), matmul_gflops(queries, dim, REFERENCE_ROWS, chunk))
        for dim in sorted(set(grid.dims))
    }
    # every layer read once from disk, chunk by chunk as the scan reads it, so the page cache holds the store
    # and no cell pays the disk read
    read_start = time.perf_counter()
    for layer in range(1, LAYERS + 1):
        for _ in layer_chunks(store, layer, chunk):
            pass
    first_read_s = time.perf_counter() - read_start
    before = resident_mib()
    rows = []
    for cell in grid.all_cells():
        peak_mib(reset=True)
        seconds = score(cell, query_layers[cell.layers], store, k)
        product = cell.is_float or cell.bits > 1  # scored by matrix products (B1: popcounts)
        gflops = 2 * queries * docs * cell.dim / seconds / 1e9
        rows.append(
            {
                "docs": docs,
                "cell": str(cell),
                "s": round(seconds, 3),
                "GB/s scanned": float(f"{queries * docs * cell.bytes_per_vector / seconds / 1e9:.3g}"),
                "GFLOP/s": round(gflops, 1) if product else None,
                "matmul GFLOP/s": round(reference[cell.dim], 1) if product else None,
                "of matmul": float(f"{gflops / reference[cell.dim]:.3g}") if product else None,
                "peak RSS MiB": round(peak_mib(), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    float_dims = sorted({cell.dim for cell in grid.all_cells() if cell.is_float})
    for layer in sorted({cell.layers for cell in grid.all_cells()}) if float_dims else []:
        peak_mib(reset=True)
        seconds = score_layer(layer, float_dims, query_layers[layer], store, k)
        # the products of the layer's cells taken one by one at the machine's matmul throughput, in seconds
        matmul_s = sum(2 * queries * docs * dim / (reference[dim] * 1e9) for dim in float_dims)
        rows.append(
            {
                "docs": docs,
                "cell": f"L{layer}-D{float_dims[0]}..D{float_dims[-1]}-B32",
                "layer scan": True,
                "s": round(seconds, 3),
                "GB/s scanned": float(f"{queries * docs * 4 * sum(float_dims) / seconds / 1e9:.3g}"),
                "GFLOP/s": round(2 * queries * docs * sum(float_dims) / seconds / 1e9, 1),
                "GFLOP/s executed": round(2 * queries * docs * float_dims[-1] / seconds / 1e9, 1),
                "of matmul": float(f"{matmul_s / seconds:.3g}"),
                "peak RSS MiB": round(peak_mib(), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    peak = max(row["peak RSS MiB"] for row in rows)
    cells = [row for row in rows if not row.get("layer scan")]
    grid_rows = [row for row in rows if row.get("layer scan") or not row["cell"].endswith("-B32")]
    search_s = mteb_search_seconds(store, query_store(workdir / "queries", query_layers), Cell(LAYERS, WIDTH, 1), k)
    summary = {
        "docs": docs,
        "cell": "summary",
        "cells": len(cells),
        "total s, cells alone": round(sum(row["s"] for row in cells), 1),
        "total s, the grid's way": round(sum(row["s"] for row in grid_rows), 1),
        "store build s": round(build_s, 1),
        "first read of every layer s": round(first_read_s, 1),
        "store GB": round(sum(store.path(name).stat().st_size for name in store.dims) / 1e9, 2),
        "RSS before scoring MiB": round(before, 1),
        "peak RSS MiB": peak,
        "peak over before MiB": round(peak - before, 1),
        "square matmul GFLOP/s": round(matmul_gflops(4096, 4096, 4096, repeats=2), 1),
        "L6-D384-B1 via CellSearch s": round(search_s, 3),
    }
    print(json.dumps(summary), flush=True)
    return [*rows, summary]


def by_bits(rows: list[dict]) -> list[dict]:
    """Per size and bit depth: cells, seconds, aggregate GB/s, share of matmul throughput (min, mean), peak RSS."""
    table = []
    for docs in dict.fromkeys(row["docs"] for row in rows):
        for bits, layer_scan in ((32, True), (32, False), (1, False), (2, False)):
            cells = [
                r
                for r in rows
                if r["docs"] == docs and r["cell"].endswith(f"-B{bits}") and r.get("layer scan", False) == layer_scan
            ]
            if not cells:
                continue
            shares = [r["of matmul"] for r in cells if r["of matmul"] is not None]
            scanned = sum(r["GB/s scanned"] * r["s"] for r in cells)
            table.append(
                {
                    "docs": docs,
                    "bits": bits,
                    "scored": "grid: a layer's dims in one scan" if layer_scan else "one cell alone",
                    "scans": len(cells),
                    "s/scan mean": round(float(np.mean([r["s"] for r in cells])), 2),
                    "total s": round(sum(r["s"] for r in cells), 1),
                    "GB/s scanned (all cells)": round(scanned / sum(r["s"] for r in cells), 2),
                    "GB/s min..max": "{}..{}".format(*(f(r["GB/s scanned"] for r in cells) for f in (min, max))),
                    "of matmul min / mean": f"{min(shares):.2f} / {np.mean(shares):.2f}" if shares else "-",
                    "peak RSS MiB": max(r["peak RSS MiB"] for r in cells),
                }
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 200_000], help="corpus sizes, in order")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=1000, help="documents kept per query (mteb asks 1000)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256, 384])
    parser.add_argument("--bits", type=int, nargs="+", default=[32, 1, 2], help="bit depths (32 = float)")
    parser.add_argument("--workdir", help="folder for the stores (default: a temporary folder under /tmp)")
    parser.add_argument("--smoke", action="store_true", help="3,000 documents, 20 queries, 12 cells; seconds")
    parser.add_argument("--one-size", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.smoke:
        args.docs, args.queries, args.layers, args.dims = [3000], 20, [1, 6], [32, 384]
    grid = Grid.from_spec(layers=args.layers, dims=args.dims, bits=args.bits)
    root = Path(tempfile.mkdtemp(prefix="grid-scale-", dir=args.workdir))
    try:
        if args.one_size:
            print("ROWS " + json.dumps(one_size(args.docs[0], args.queries, grid, args.top_k, root)))
            return
        rows = []
        for docs in args.docs:  # a fresh process per size: its own peak memory
            child = [sys.executable, __file__, "--one-size", "--docs", str(docs), "--queries", str(args.queries)]
            child += ["--top-k", str(args.top_k), "--layers", *map(str, args.layers), "--dims", *map(str, args.dims)]
            child += ["--bits", *map(str, args.bits)]
            child += ["--workdir", str(root)]
            output = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            rows += json.loads(next(line[5:] for line in output.splitlines() if line.startswith("ROWS ")))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cells = [row for row in rows if row["cell"] != "summary"]
    print(markdown(by_bits(cells)))
    print(markdown([row for row in rows if row["cell"] == "summary"]))
    name = "grid_scale" if args.bits == [32, 1, 2] else "grid_scale-B" + "-B".join(map(str, args.bits))
    print(write_result(name, "python " + " ".join(sys.argv), rows, args.smoke))


if __name__ == "__main__":
    main()
