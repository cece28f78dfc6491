"""Top-100 search over N random codes: packed popcount (faiss IndexBinaryFlat, ours) vs float32 exact.

    python bench/binary_search.py                # 1M vectors, 256/512/1024 bits
    python bench/binary_search.py --smoke        # seconds

Reports ms per query, GB/s of database scanned, and bytes per vector. faiss has specialised Hamming
kernels for code sizes of 4, 8, 16, 20, 32 and 64 bytes (32..512 bits); other sizes use a generic loop.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.common import markdown, median_seconds, write_result
from trainer.binary.codes import PackedCodes, inner_products


def measure(n: int, queries: int, bits: int, repeats: int, float_limit: int, rng: np.random.Generator) -> dict:
    import faiss

    database = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    query = rng.integers(0, 256, size=(queries, bits // 8), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(bits)
    index.add(database)
    faiss_s = median_seconds(lambda: index.search(query, 100), repeats) / queries
    codes = PackedCodes(database[:, None, :], bits, np.full(n, np.sqrt(bits), dtype=np.float32))
    query_codes = PackedCodes(query[:1, None, :], bits, np.full(1, np.sqrt(bits), dtype=np.float32))

    def ours() -> None:
        scores = inner_products(query_codes, codes)[0]
        np.argpartition(-scores, 100)[:100]

    ours_s = median_seconds(ours, repeats)
    float_n = min(n, float_limit)
    flat = faiss.IndexFlatIP(bits)
    flat.add(rng.standard_normal((float_n, bits), dtype=np.float32))
    float_query = rng.standard_normal((queries, bits), dtype=np.float32)
    float_s = median_seconds(lambda: flat.search(float_query, 100), repeats) / queries * (n / float_n)
    code_bytes, float_bytes = bits // 8, bits * 4
    return {
        "bits (= float dims)": bits,
        "faiss binary ms/query": faiss_s * 1e3,
        "ours popcount ms/query": ours_s * 1e3,
        "float32 exact ms/query": float_s * 1e3,
        "faiss binary GB/s": n * code_bytes / faiss_s / 1e9,
        "ours GB/s": n * code_bytes / ours_s / 1e9,
        "float32 GB/s": n * float_bytes / float_s / 1e9,
        "bytes/vector binary": code_bytes,
        "bytes/vector float32": float_bytes,
    }


def run(n: int, queries: int, bit_sizes: list[int], repeats: int, float_limit: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [measure(n, queries, bits, repeats, float_limit, rng) for bits in bit_sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument(
        "--float-limit",
        type=int,
        default=250_000,
        help="float32 vectors actually searched; time is scaled linearly to --n (memory cap)",
    )
    args = parser.parse_args()
    if args.smoke:
        rows = run(2000, 4, [256], repeats=1, float_limit=2000)
    else:
        rows = run(args.n, args.queries, [256, 512, 1024], repeats=5, float_limit=args.float_limit)
    print(markdown(rows))
    print(write_result("binary_search", "python " + " ".join(sys.argv), rows, args.smoke))


if __name__ == "__main__":
    main()
