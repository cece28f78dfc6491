"""Cost of one training step (forward, backward, AdamW step) on the same batch and model:

- plain: InfoNCE on the full model (sentence-transformers' MultipleNegativesRankingLoss);
- starbucks: our ElasticLoss with 6 (layer, dim) cells, each with InfoNCE + KL to the full cell;
- full: starbucks + binary heads at 1/2/4 bits + distillation from cached teacher embeddings (labels);
- ST Matryoshka2dLoss: sentence-transformers' loss (one sampled layer and dim per step).

    python bench/train_step.py                       # medians over repeats, batch 32
    python bench/train_step.py --peak-memory         # peak RSS per variant at batch 32 and 128
    python bench/train_step.py --smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

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


def build(variant: str, model: SentenceTransformer):
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
    return ElasticLoss(model, selection, terms, heads, bits)


def step_function(variant: str, batch_size: int, max_length: int):
    torch.manual_seed(0)
    model = SentenceTransformer(MODEL)
    model.max_seq_length = max_length
    loss = build(variant, model)
    optimizer = torch.optim.AdamW(loss.parameters(), lr=1e-5)
    queries, docs = batch_texts(batch_size)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-memory", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.max_length, args.repeats = 4, 16, 1
    command = "python " + " ".join(sys.argv)
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
