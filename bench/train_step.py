"""Cost of one training step (forward, backward, AdamW step) on the same batch and model:

- plain: InfoNCE on the full model (sentence-transformers' MultipleNegativesRankingLoss);
- starbucks: our ElasticLoss with 6 (layer, dim) cells, each with InfoNCE + KL to the full cell;
- full: starbucks + binary heads at 1/2/4 bits + distillation from cached teacher embeddings (labels);
- ST Matryoshka2dLoss: sentence-transformers' loss (one sampled layer and dim per step).

    python bench/train_step.py                       # medians over repeats, batch 32
    python bench/train_step.py --peak-memory         # peak RSS per variant at batch 32 and 128
    python bench/train_step.py --batch-scaling --repeats 2   # full recipe, batch 32..1024, cached or not
    python bench/train_step.py --smoke               # (with any of the modes)

``--batch-scaling``: peak resident memory and seconds per example of the full recipe at batch 32, 128, 512
and 1024, uncached and with gradient caching (``loss.mini_batch_size``, 32 by default), each in a fresh
process; the targets (issue 13) compare cached batch 1024 with uncached batch 32: memory at most 1.3x, time
per example at most 1.25x. Batches come from one fixed shuffle of the cranfield and cisi train pairs.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import Matryoshka2dLoss, MultipleNegativesRankingLoss

from bench.common import markdown, median_seconds, write_result
from trainer.binary.heads import BinaryHeads
from trainer.grid import Cell, CellSelection, Grid
from trainer.train.losses import ElasticLoss, InfoNCELoss
from trainer.train.losses import Matryoshka2dLoss as Ours
from trainer.train.losses.binary import BinaryCodeLoss
from trainer.train.losses.distill import DistillationLoss

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CELLS = ["L1-D32", "L2-D64", "L3-D128", "L4-D192", "L5-D256", "L6-D384"]
VARIANTS = ("plain", "starbucks", "full", "ST Matryoshka2dLoss")
TEACHER_DIM = 768


def batch_texts(size: int) -> tuple[list[str], list[str]]:
    from pathlib import Path

    from trainer import beir

    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cranfield"
    if folder.is_dir():
        pairs = beir.relevant_pairs(beir.load_split(folder, "train"))
        pairs = list(dict(pairs).items())[:size]
    else:  # still a fair cost comparison: every variant sees the same texts
        pairs = [(f"question {i} about wings", f"answer {i} " + "lift and drag " * 30) for i in range(size)]
    return [q for q, _ in pairs], [d for _, d in pairs]


def pair_pool(size: int) -> tuple[list[str], list[str]]:
    """The first ``size`` of one fixed shuffle of every (query, relevant document) pair of the cranfield and cisi
    train splits (2000+ pairs, so every batch size draws from the same texts); synthetic pairs without the data."""
    from pathlib import Path

    from trainer import beir

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    pairs = [
        pair
        for name in ("cranfield", "cisi")
        if (data / name).is_dir()
        for pair in beir.relevant_pairs(beir.load_split(data / name, "train"))
    ]
    if len(pairs) < size:
        pairs = [(f"question {i} about wings", f"answer {i} " + "lift and drag " * (i % 40)) for i in range(size)]
    random.Random(0).shuffle(pairs)
    return [q for q, _ in pairs[:size]], [d for _, d in pairs[:size]]


def build(variant: str, model: SentenceTransformer, mini_batch_size: int | None = None):
    if variant == "plain":
        return MultipleNegativesRankingLoss(model)
    if variant == "ST Matryoshka2dLoss":
        return Matryoshka2dLoss(model, MultipleNegativesRankingLoss(model), [384, 256, 192, 128, 64, 32])
    grid = Grid.from_spec(cells=CELLS)
    selection = CellSelection(grid, Cell(6, 384), "starbucks")
    terms = {"matryoshka": Ours(InfoNCELoss())}
    heads, bits = None, ()
    if variant == "full":
        bits = (1, 2, 4)
        heads = BinaryHeads(dims=grid.dims, bits=bits, hidden=512)
        terms["binary"] = BinaryCodeLoss(heads, bits, InfoNCELoss())
        terms["distill"] = DistillationLoss(384, TEACHER_DIM, relative_max_pairs=512)
    return ElasticLoss(model, selection, terms, heads, bits, mini_batch_size=mini_batch_size)


def step_function(
    variant: str, batch_size: int, max_length: int, mini_batch_size: int | None = None, texts=batch_texts
):
    torch.manual_seed(0)
    model = SentenceTransformer(MODEL)
    model.max_seq_length = max_length
    loss = build(variant, model, mini_batch_size)
    optimizer = torch.optim.AdamW(loss.parameters(), lr=1e-5)
    queries, docs = texts(batch_size)
    features = [model.preprocess(queries), model.preprocess(docs)]
    labels = torch.nn.functional.normalize(torch.randn(len(queries), 2, TEACHER_DIM), dim=-1)

    def step() -> None:
        value = loss([dict(f) for f in features], labels)
        if isinstance(value, dict):
            value = torch.stack(list(value.values())).sum()
        value.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def peak_memory(variant: str, batch_size: int, max_length: int) -> float:
    """Peak resident memory (MiB) of a fresh process running 2 steps of ``variant``."""
    code = (
        f"from bench.train_step import step_function; s = step_function({variant!r}, {batch_size}, {max_length}); "
        "s(); s(); import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def measure_step(batch_size: int, mini_batch_size: int | None, max_length: int, repeats: int) -> list[float]:
    """[peak RSS MiB, median seconds per example] of full-recipe steps: one warm-up step, then ``repeats``."""
    step = step_function("full", batch_size, max_length, mini_batch_size, texts=pair_pool)
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, statistics.median(times) / batch_size]


def scaling_point(batch_size: int, mini_batch_size: int | None, max_length: int, repeats: int) -> dict:
    """``measure_step`` in a fresh process (so that its peak memory is its own); a failure (e.g. killed for
    memory) is recorded in the row, not raised."""
    code = (
        "import json; from bench.train_step import measure_step; "
        f"print(json.dumps(measure_step({batch_size}, {mini_batch_size}, {max_length}, {repeats})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    row = {"batch": batch_size, "mini_batch_size": mini_batch_size or "-"}
    if result.returncode != 0:  # a negative code is the signal that ended it (9: e.g. the kernel's OOM killer)
        ended = f"killed by signal {-result.returncode}" if result.returncode < 0 else result.stderr.strip()[-300:]
        return {**row, "peak RSS MiB": None, "s/example": None, "error": ended}
    peak, seconds = json.loads(result.stdout.strip().splitlines()[-1])
    return {**row, "peak RSS MiB": peak, "s/example": seconds}


def batch_scaling(sizes: list[int], mini_batch_size: int, max_length: int, repeats: int) -> list[dict]:
    """Every size uncached and cached, with ratios to uncached ``sizes[0]`` (the issue's batch 32)."""
    configs = [(b, m) for b in sizes for m in (None, mini_batch_size) if m is None or m < b]
    rows = [scaling_point(b, m, max_length, repeats) for b, m in configs]
    base = rows[0]
    for row in rows:
        known = row["peak RSS MiB"] is not None and base["peak RSS MiB"] is not None
        row["memory x base"] = row["peak RSS MiB"] / base["peak RSS MiB"] if known else None
        row["time/example x base"] = row["s/example"] / base["s/example"] if known else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-memory", action="store_true")
    parser.add_argument("--batch-scaling", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 1024])
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.max_length, args.repeats = 4, 16, 1
    command = "python " + " ".join(sys.argv)
    if args.batch_scaling:
        if args.smoke:
            args.sizes, args.mini_batch_size = [4], 2
        rows = batch_scaling(args.sizes, args.mini_batch_size, args.max_length, args.repeats)
        print(markdown(rows))
        print(write_result("train_batch", command, rows, args.smoke))
        return
    if args.peak_memory:
        sizes = (4,) if args.smoke else (32, 128)
        rows = [
            {"variant": v, "batch": b, "peak RSS MiB": peak_memory(v, b, args.max_length)}
            for b in sizes
            for v in VARIANTS
        ]
        print(markdown(rows))
        print(write_result("train_memory", command, rows, args.smoke))
        return
    seconds = {v: median_seconds(step_function(v, args.batch_size, args.max_length), args.repeats) for v in VARIANTS}
    rows = [{"variant": v, "s/step (median)": s, "x plain": s / seconds["plain"]} for v, s in seconds.items()]
    print(markdown(rows))
    print(json.dumps(seconds))
    print(write_result("train_step", command, rows, args.smoke))


if __name__ == "__main__":
    main()
