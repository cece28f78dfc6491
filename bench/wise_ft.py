"""WiSE-FT of finished flagship runs: each run's encoder pulled toward its starting weights, then the whole grid.

    python bench/wise_ft.py --runs runs/steps1000/ours/seed42/model runs/steps1000/ours/seed43/model \
        --alphas 0.7 0.85 --out runs/wise --name wise-ft-steps1000

For each run and ``alpha`` this writes ``alpha * trained + (1 - alpha) * starting weights`` (``python -m
trainer wise-ft``, the recipe's ``wise_ft.alpha`` applied after training) into ``<out>/<seed folder>/alpha-<alpha>``
and scores it with ``python -m eval grid`` as ``bench/flagship.py`` does (layers 1..6 x dims 32..384, float and
1/2/4-bit codes, cranfield/cisi/npl test, 128 tokens). Finished evaluations are reused. Writes
``bench/results/<name>.json``: cell -> mean nDCG@10 over the three test sets, per run and alpha.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from bench.common import RESULTS, provenance
from bench.flagship import GRID, TASKS, evaluate, scores
from trainer.errors import OneLineParser, run_cli
from trainer.serve.checkpoint import check_model_folder
from trainer.train.recipe import check_alpha
from trainer.train.wise_ft import wise_ft_checkpoint


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="trained models (<seed folder>/model)")
    parser.add_argument("--alphas", nargs="+", type=float, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/wise"))
    parser.add_argument("--name", default="wise-ft")
    args = parser.parse_args()
    run_cli(lambda: merge_and_score(args))


def merge_and_score(args: argparse.Namespace) -> None:
    for run in args.runs:  # every input checked before the first merge
        check_model_folder(run, "--runs")
    for alpha in args.alphas:
        check_alpha(alpha, "--alphas")
    results = {}
    for run in args.runs:
        for alpha in args.alphas:
            folder = args.out / run.parent.name / f"alpha-{alpha:g}"
            model = folder / "model"
            if not (model / "modules.json").is_file():
                wise_ft_checkpoint(run, alpha, model)
            grid = evaluate(str(model), folder / "eval", folder / "log.txt", GRID, TASKS, "trained")
            results.setdefault(str(run), {})[f"{alpha:g}"] = scores(grid)
    payload = {**provenance(), "alphas": args.alphas, "results": results}
    target = RESULTS / f"{args.name}.json"
    target.write_text(json.dumps(payload, indent=1) + "\n")
    print(yaml.safe_dump({run: {a: s["L6-D384-B32"] for a, s in r.items()} for run, r in results.items()}))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
