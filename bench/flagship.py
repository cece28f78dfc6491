"""The flagship experiment: our recipe against sentence-transformers' Matryoshka2dLoss, with seeds and an ablation.

Student sentence-transformers/all-MiniLM-L6-v2. Every model is evaluated at every cell of layers 1..6 x dims
32..384 at float, 1, 2 and 4 bits on the test splits of cranfield, cisi and npl (texts cut at 128 tokens);
a model's binary cells are also scored with the parameter-free residual sign quantiser (``--codes sign``: sign
bits at 1 bit), the baseline learned codes must beat.

Runs (each seed trains anew; the ST baseline gets exactly the same pairs, steps, batch and learning rate):
- ``ours``: configs/flagship.yaml, the published recipe;
- the ablation rows (``--ablation``), cumulative: the Starbucks-style contrastive term alone, + KL, + binary
  (joint), + distillation (the published recipe's own ``distill`` section, its self-anchor on the last and first layers;
  all-mpnet-base-v2 for a recipe without one), + label-free corpus texts (``ABLATION`` below);
- ``st``: bench/st_baseline.py (Matryoshka2dLoss around MultipleNegativesRankingLoss);
- ``untrained``: the student as is.

    python bench/flagship.py                       # ours + ST, 3 seeds
    python bench/flagship.py --ablation            # also the five ablation rows, 3 seeds each
    python bench/flagship.py --smoke               # a few steps, one task, two cells
    python bench/flagship.py --held-out cranfield  # train without cranfield, evaluate on cranfield test

Finished runs and evaluations (their output exists) are skipped, so an interrupted experiment resumes.
Writes runs/flagship/ and bench/results/flagship.{json,md}: mean +- std over seeds of the mean nDCG@10 over
the three tasks, per cell, and the issue's done-when checks.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

import yaml

from bench.common import RESULTS, provenance

STUDENT = "sentence-transformers/all-MiniLM-L6-v2"
RECIPE = Path("configs/flagship.yaml")
COLLECTIONS = ("cranfield", "cisi", "npl")
TASKS = [f"../shared/data/{name}:test" for name in COLLECTIONS]
GRID = ["--layers", "1", "2", "3", "4", "5", "6", "--dims", "32", "64", "128", "256", "384"]
BITS = ["32", "1", "2", "4"]
EVAL_MAX_TOKENS = "128"
SEEDS = [42, 43, 44]

# The components the ablation adds one at a time (on top of configs/flagship.yaml's model, data and training).
DISTILL = {
    "teacher": "sentence-transformers/all-mpnet-base-v2",
    "max_seq_length": 128,
    "relative_max_pairs": 512,
}
TEXTS = [
    {"texts": f"../shared/data/{name}", "max_samples": 1000, "name": f"{name}-texts"}
    for name in ("cranfield", "cisi", "npl")
]


ABLATION = {
    "contrastive": "Starbucks-style contrastive term alone (every dim of the last layer + earlier cells)",
    "+kl": "+ KL of every cell to the full cell",
    "+binary": "+ 1/2/4-bit heads trained jointly",
    "+distill": "+ distillation (Jasper/Stella losses): the published recipe's own, else from all-mpnet-base-v2",
    "+texts": "+ label-free corpus texts (distillation only)",
}


def ablation_recipe(base: dict, row: str, distill: dict) -> dict:
    """The cumulative ablation row ``row`` built from the published recipe ``base``: each row keeps the
    components of the rows before it (``base``'s settings where it has them) and adds its own."""
    recipe = copy.deepcopy(base)
    step = list(ABLATION).index(row)
    if step < 1:
        recipe["loss"]["kl_weight"] = 0.0
    if step < 2:
        recipe.pop("binary", None)
    else:
        recipe.setdefault("binary", {"bits": [1, 2, 4]})
    if step < 3:
        recipe.pop("distill", None)
    else:
        recipe.setdefault("distill", distill)
    pairs = [source for source in recipe["data"]["train"] if "texts" not in source]
    recipe["data"]["train"] = pairs + (TEXTS if step >= 4 else [])
    return recipe


def held_out_recipe(base: dict, collection: str) -> dict:
    """``base`` without any training source read from ``collection`` (its pairs or its texts): a model trained
    on it has never seen that collection, so its test split stands in for a new retrieval collection."""
    recipe = copy.deepcopy(base)
    recipe["data"]["train"] = [
        source
        for source in recipe["data"]["train"]
        if Path(str(source.get("beir") or source.get("texts") or "")).name != collection
    ]
    return recipe


def run(command: list[str], log: Path) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("a") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def evaluate(model: str, out: Path, log: Path, grid: list[str], tasks: list[str], codes: str) -> dict:
    """Grid evaluation of ``model`` into ``out`` (cached embeddings shared by both code sources)."""
    target = out / f"grid-{codes}.json"
    if not target.is_file():
        command = [sys.executable, "-m", "eval", "grid", "--model", model, "--tasks", *tasks, *grid, "--bits", *BITS]
        command += ["--max-seq-length", EVAL_MAX_TOKENS, "--output", str(out), "--codes", codes]
        run(command, log)
        (out / "grid.json").replace(target)
    return json.loads(target.read_text())


def scores(grid: dict) -> dict[str, float]:
    """cell -> mean nDCG@10 over the tasks."""
    return {e["cell"]: mean(s["ndcg_at_10"] for s in e["scores"].values()) for e in grid["cells"]}


def train(name: str, recipe: dict, seed: int, runs: Path, log: Path, overrides: list[str]) -> Path:
    """Train ``recipe`` with ``seed`` into ``runs/<name>/seed<seed>/model`` unless that model exists."""
    folder = runs / name / f"seed{seed}"
    if (folder / "model" / "modules.json").is_file():
        return folder / "model"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    recipe = copy.deepcopy(recipe)
    recipe["training"].update(output_dir=str(folder / "model"), seed=seed, save_strategy="no")
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if name == "st":
        run([sys.executable, "bench/st_baseline.py", str(recipe_file), str(folder / "model"), *overrides], log)
    else:
        run(
            [sys.executable, "-m", "trainer", "train", str(recipe_file), "--overwrite_output_dir", "true", *overrides],
            log,
        )
    return folder / "model"


def earlier_scores(payload: dict) -> dict[tuple[str, int], tuple[dict, dict | None]]:
    """(model, seed) -> (scores, sign-code scores or None) from an earlier result of this script, whose
    per-model lists follow the order of its ``timings_s`` keys ("<model> seed <seed>")."""
    seeds: dict[str, list[int]] = {}
    for key in payload["timings_s"]:
        name, seed = key.rsplit(" seed ", 1)
        seeds.setdefault(name, []).append(int(seed))
    found = {}
    for name, per_seed in payload["results"].items():
        signs = payload["sign_codes"].get(name, [None] * len(per_seed))
        for seed, scored, signed in zip(seeds[name], per_seed, signs, strict=True):
            found[name, seed] = (scored, signed)
    return found


def summarise(values: list[float]) -> str:
    return f"{mean(values):.3f} ± {stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(results: dict[str, list[dict[str, float]]], cells: list[str], title: str) -> str:
    lines = [f"### {title}", "", "| model | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
    for name, per_seed in results.items():
        row = [summarise([s[c] for s in per_seed]) if all(c in s for s in per_seed) else "-" for c in cells]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines + [""])


def checks(
    ours: list[dict[str, float]], ours_sign: list[dict[str, float]], st: list[dict[str, float]], untrained: dict
) -> list[str]:
    """The issue's done-when criteria on means over seeds; one line each, with the cells that fail."""

    def m(runs: list[dict[str, float]], cell: str) -> float:
        return mean(r[cell] for r in runs)

    floats = [c for c in ours[0] if c.endswith("-B32")]
    lines = []
    below = [c for c in floats if m(ours, c) < m(st, c)]
    lines.append(
        f"float cells >= ST Matryoshka2dLoss: {len(floats) - len(below)}/{len(floats)}"
        + (f" (below: {', '.join(below)})" if below else "")
    )
    full = "L6-D384-B32"
    lines.append(
        (
            f"full cell {m(ours, full):.4f}: >= untrained {untrained[full]:.4f}: {m(ours, full) >= untrained[full]}; "
            if untrained
            else f"full cell {m(ours, full):.4f}: "
        )
        + f"within 0.005 of ST {m(st, full):.4f} or above: {m(ours, full) >= m(st, full) - 0.005}"
    )
    for name, baseline in (("sign bits of our float cells", ours_sign), ("sign bits of ST's float cells", st)):
        cells = [c.replace("-B32", "-B1") for c in floats]
        below = [c for c in cells if m(ours, c) < m(baseline, c)]
        lines.append(
            f"learned B1 >= {name}: {len(cells) - len(below)}/{len(cells)}"
            + (f" (below: {', '.join(below)})" if below else "")
        )
    for low, high in ((1, 2), (2, 4)):
        cells = [c.replace("-B32", f"-B{high}") for c in floats]
        below = [c for c in cells if m(ours, c) < m(ours, c.replace(f"-B{high}", f"-B{low}"))]
        lines.append(
            f"B{high} >= B{low}: {len(cells) - len(below)}/{len(cells)}"
            + (f" (below: {', '.join(below)})" if below else "")
        )
    ratio = m(ours, "L6-D384-B2") / m(ours, full)
    lines.append(f"L6-D384-B2 / L6-D384 float = {ratio:.3f} (>= 0.97: {ratio >= 0.97})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--ablation", action="store_true", help="also train and evaluate the five ablation rows")
    parser.add_argument("--models", nargs="+", help="only these of: ours st " + " ".join(ABLATION))
    parser.add_argument("--smoke", action="store_true", help="a few steps, one task, two cells")
    parser.add_argument(
        "--recipe", type=Path, default=RECIPE, help="our recipe (ours, the ablation rows and ST's steps, batch, lr)"
    )
    parser.add_argument(
        "--held-out",
        choices=COLLECTIONS,
        help="train without this collection's pairs and evaluate on its test split only (leave one collection out)",
    )
    parser.add_argument("--runs", default="runs/flagship")
    parser.add_argument("--name", default="flagship", help="result file name under bench/results/")
    parser.add_argument(
        "--report", action="store_true", help="train and evaluate nothing: report the runs already evaluated"
    )
    parser.add_argument(
        "--earlier",
        type=Path,
        help="an earlier result file (bench/results/flagship.json) whose per-seed scores stand in for runs "
        "that are not under --runs (e.g. made on another machine); its command, commit and date are kept",
    )
    args = parser.parse_args()
    runs = Path(args.runs + ("-smoke" if args.smoke else ""))
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "log.txt"
    base = yaml.safe_load(args.recipe.read_text())
    overrides, tasks, grid = [], TASKS, GRID
    if args.smoke:
        overrides = ["--max_steps", "2", "--per_device_train_batch_size", "8"]
        tasks, grid = TASKS[:1], ["--cells", "L2-D64", "L6-D384"]
    if args.held_out:
        base, tasks = held_out_recipe(base, args.held_out), [f"../shared/data/{args.held_out}:test"]
    distill = {**DISTILL, "teacher": "self"} if args.smoke else DISTILL
    models = {"ours": base, "st": base}
    if args.ablation or args.models:
        models.update({row: ablation_recipe(base, row, distill) for row in ABLATION})
    if args.models:
        models = {name: recipe for name, recipe in models.items() if name in args.models}
    timings, results, sign_results = {}, {}, {}
    earlier_payload = json.loads(args.earlier.read_text()) if args.earlier else None
    earlier = earlier_scores(earlier_payload) if earlier_payload else {}
    for name, recipe in models.items():
        # an ablation row that is the published recipe reuses its runs
        folder = "ours" if name in ABLATION and recipe == base else name
        for seed in args.seeds:
            done = (runs / folder / f"seed{seed}" / "eval" / "grid-trained.json").is_file()
            if not done and (folder, seed) in earlier:
                scored, signed = earlier[folder, seed]
                results.setdefault(name, []).append(scored)
                if signed is not None:
                    sign_results.setdefault(name, []).append(signed)
                timings[f"{name} seed {seed}"] = None
                continue
            if args.report and not done:
                continue
            start = time.perf_counter()
            model = train(folder, recipe, seed, runs, log, overrides)
            timings[f"{name} seed {seed}"] = time.perf_counter() - start
            out = model.parent / "eval"
            results.setdefault(name, []).append(scores(evaluate(str(model), out, log, grid, tasks, "trained")))
            if name != "st":
                sign_results.setdefault(name, []).append(scores(evaluate(str(model), out, log, grid, tasks, "sign")))
    untrained_grid = runs / "untrained" / "eval"
    if (untrained_grid / "grid-trained.json").is_file() or not (args.report or earlier_payload):
        untrained = scores(evaluate(STUDENT, untrained_grid, log, grid, tasks, "trained"))
    else:  # not evaluated here: the earlier result's, or none in a report
        untrained = earlier_payload["untrained"] if earlier_payload else {}
    reference = untrained or next(iter(results.values()))[0]
    cells = sorted(reference, key=lambda c: (int(c.split("-B")[1]) != 32, int(c.split("-B")[1]), c))
    headline = [
        c
        for c in (
            "L6-D384-B32",
            "L6-D128-B32",
            "L6-D32-B32",
            "L3-D128-B32",
            "L1-D32-B32",
            "L6-D384-B1",
            "L6-D384-B2",
            "L6-D384-B4",
        )
        if c in reference
    ]
    labels = {"st": "ST Matryoshka2dLoss", "ours": f"ours ({args.recipe})"}
    rows = {"untrained": [untrained]} if untrained else {}
    rows |= {labels.get(name, f"ablation {name}"): runs_ for name, runs_ in results.items()}
    signs = {f"{labels.get(name, name)}, --codes sign": sign_results[name] for name in sign_results}
    report = [
        f"Seeds per model: {', '.join(f'{name} {len(runs_)}' for name, runs_ in results.items())} (of {args.seeds}); "
        f"nDCG@10, mean over {', '.join(t.split('/')[-1] for t in tasks)}; mean ± std over seeds.",
        "",
        table(rows, headline, "Headline cells"),
        table({**rows, **signs}, cells, "Every cell"),
    ]
    if "ours" in results and "st" in results:
        report += ["### Done-when checks (means over seeds)", ""]
        report += [f"- {line}" for line in checks(results["ours"], sign_results["ours"], results["st"], untrained)]
    text = "\n".join(report)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    name = f"{args.name}-smoke" if args.smoke else args.name
    payload = {
        **provenance(),
        "seeds": args.seeds,
        "earlier": {k: earlier_payload[k] for k in ("command", "commit", "date")} if earlier_payload else None,
        "timings_s": timings,
        "untrained": untrained,
        "results": results,
        "sign_codes": sign_results,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
