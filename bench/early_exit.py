"""Encode throughput of each layer count of one checkpoint (real early exit); ideal speed-up is L/l.

python bench/early_exit.py [--model sentence-transformers/all-MiniLM-L6-v2]
python bench/early_exit.py --smoke
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import markdown, median_seconds, write_result
from trainer.cell_vectors import embedding_dim, num_layers
from trainer.serve.model import load


def texts(n: int) -> list[str]:
    words = "lift drag wing boundary layer shock flow pressure heat transfer supersonic nozzle".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(24 + i % 40)) for i in range(n)]


def run(model_id: str, n: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    elastic = load(model_id)
    depth, width = num_layers(elastic.model), embedding_dim(elastic.model)
    batch = texts(n)
    rows, full = [], None
    for layers in range(depth, 0, -1):
        encoder = elastic.at(f"L{layers}-D{width}")
        seconds = median_seconds(lambda encoder=encoder: encoder.encode(batch, batch_size=32), repeats)
        full = full or seconds
        rows.append({"layers": layers, "texts/s": n / seconds, "speed-up": full / seconds, "ideal L/l": depth / layers})
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
