"""Encode throughput of each layer count of one checkpoint (real early exit); ideal speed-up is L/l.

Beside it, the throughput the grid's cost measurement reports for the same texts: ``ExitClock`` timing every
block's exit inside one full-depth pass (median of the repeats), which is what ``eval.cost`` uses instead of
encoding once per layer count.

python bench/early_exit.py [--model sentence-transformers/all-MiniLM-L6-v2]
python bench/early_exit.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.common import markdown, median_seconds, write_result
from trainer.cell_vectors import ExitClock, embedding_dim, encode_layers, num_layers
from trainer.serve.model import load


def texts(n: int) -> list[str]:
    words = "lift drag wing boundary layer shock flow pressure heat transfer supersonic nozzle".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(24 + i % 40)) for i in range(n)]


def run(model_id: str, n: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    elastic = load(model_id)
    depth, width = num_layers(elastic.model), embedding_dim(elastic.model)
    batch = texts(n)
    encode_layers(elastic.model, batch[:32], [depth], batch_size=32)  # warm-up
    clocks = [ExitClock() for _ in range(repeats)]
    for clock in clocks:
        encode_layers(elastic.model, batch, [depth], batch_size=32, clock=clock)
    rows, full = [], None
    for layers in range(depth, 0, -1):
        encoder = elastic.at(f"L{layers}-D{width}")
        seconds = median_seconds(lambda encoder=encoder: encoder.encode(batch, batch_size=32), repeats)
        full = full or seconds
        clocked = statistics.median(clock.texts_per_second()[layers] for clock in clocks)
        rows.append(
            {
                "layers": layers,
                "texts/s": n / seconds,
                "speed-up": full / seconds,
                "ideal L/l": depth / layers,
                "clocked texts/s": clocked,
                "clocked / real": clocked * seconds / n,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    rows = run(args.model, 16, 1) if args.smoke else run(args.model, args.texts, 3)
    print(markdown(rows))
    print(write_result("early_exit", "python " + " ".join(sys.argv), rows, args.smoke))


if __name__ == "__main__":
    main()
