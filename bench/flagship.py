"""The flagship experiment: untrained all-MiniLM-L6-v2, the teacher all-mpnet-base-v2, our recipe
(configs/flagship.yaml: grid cells + 1/2/4-bit heads + distillation) and sentence-transformers'
Matryoshka2dLoss with the same data, steps and batch, each evaluated at every layer x dim x bit depth
on the test splits of cranfield, cisi and npl.

    python bench/flagship.py                 # about 40 minutes on 2 CPU cores
    python bench/flagship.py --smoke         # checks the wiring on a tiny budget

Stages already done (their output exists) are skipped, so an interrupted run resumes.
Writes runs/flagship/ and bench/results/flagship.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

from bench.common import RESULTS, commit, machine
from trainer.grid import Cell

STUDENT = "sentence-transformers/all-MiniLM-L6-v2"
TEACHER = "sentence-transformers/all-mpnet-base-v2"
TASKS = [f"../shared/data/{name}:test" for name in ("cranfield", "cisi", "npl")]
GRID = ["--layers", "1", "2", "3", "4", "5", "6", "--dims", "32", "64", "128", "256", "384"]
EVAL_MAX_TOKENS = "128"
# The teacher (12 layers, 768 dims) needs about 15 minutes for npl's 11,429 documents on 2 CPU cores, so it
# is evaluated on cranfield and cisi only; retention is the mean over the tasks the teacher was scored on.
TEACHER_TASKS = TASKS[:2]


def run(command: list[str], log: Path) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("a") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def evaluate(model: str, out: Path, bits: list[str], log: Path, grid: list[str] = GRID, tasks=TASKS) -> dict:
    if not (out / "grid.json").is_file():
        run(
            [
                sys.executable,
                "-m",
                "eval",
                "grid",
                "--model",
                model,
                "--tasks",
                *tasks,
                *grid,
                "--bits",
                *bits,
                "--max-seq-length",
                EVAL_MAX_TOKENS,
                "--output",
                str(out),
            ],
            log,
        )
    return json.loads((out / "grid.json").read_text())


def scores(grid: dict) -> dict[str, dict[str, float]]:
    """cell -> task -> nDCG@10."""
    return {e["cell"]: {t: s["ndcg_at_10"] for t, s in e["scores"].items()} for e in grid["cells"]}


def tables(results: dict[str, dict], teacher_full: dict[str, float]) -> str:
    """One table per bit depth: mean nDCG@10 over tasks per model, and our retention of the teacher."""
    lines = []
    cells = sorted({c for r in results.values() for c in r}, key=lambda c: Cell.parse(c))
    for bits in sorted({int(c.split("-B")[1]) for c in cells}, reverse=True):
        lines += [
            f"### {'float32' if bits == 32 else f'{bits} bit(s) per dim'}",
            "",
            "| cell | " + " | ".join(results) + " | ours / teacher full |",
            "|---|" + "---|" * (len(results) + 1),
        ]
        for cell in [c for c in cells if c.endswith(f"-B{bits}")]:
            row = []
            for model_scores in results.values():
                row.append(f"{mean(model_scores[cell].values()):.3f}" if cell in model_scores else "-")
            ours = results["ours"].get(cell)
            retention = mean(ours[t] / teacher_full[t] for t in teacher_full) if ours else None
            share = f"{retention:.0%}" if retention is not None else "-"
            lines.append(f"| {cell} | " + " | ".join(row) + f" | {share} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps, one task, two cells")
    parser.add_argument("--runs", default="runs/flagship")
    parser.add_argument("--name", default="flagship", help="result file name under bench/results/")
    args = parser.parse_args()
    runs = Path(args.runs + ("-smoke" if args.smoke else ""))
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "log.txt"
    overrides, tasks, grid = [], TASKS, GRID
    if args.smoke:
        overrides = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--distill.teacher", "self"]
        tasks, grid = TASKS[:1], ["--cells", "L2-D64", "L6-D384"]
    timings = {}
    if not (runs / "ours" / "elastic_manifest.json").is_file():
        timings["train ours"] = run(
            [sys.executable, "-m", "trainer", "train", "configs/flagship.yaml", *overrides], log
        )
    baseline = runs / "st-matryoshka2d"
    if not (baseline / "modules.json").is_file():
        command = [sys.executable, "bench/st_baseline.py", "configs/flagship.yaml", str(baseline), *overrides]
        timings["train ST Matryoshka2dLoss"] = run(command, log)
    results = {
        "untrained": scores(evaluate(STUDENT, runs / "eval-untrained", ["32", "1"], log, grid, tasks)),
        "ST Matryoshka2dLoss": scores(evaluate(str(baseline), runs / "eval-st", ["32", "1"], log, grid, tasks)),
        "ours": scores(evaluate(str(runs / "ours"), runs / "eval-ours", ["32", "1", "2", "4"], log, grid, tasks)),
    }
    teacher_tasks = [t for t in tasks if t in TEACHER_TASKS]
    teacher = scores(evaluate(TEACHER, runs / "eval-teacher", ["32", "1"], log, ["--cells", "L12-D768"], teacher_tasks))
    teacher_full = teacher["L12-D768-B32"]
    report = "\n".join(
        [
            f"Teacher {TEACHER} full cell nDCG@10: "
            + ", ".join(f"{t} {v:.3f}" for t, v in teacher_full.items())
            + f" (sign bits: {mean(teacher['L12-D768-B1'].values()):.3f} mean)",
            "",
            tables(results, teacher_full),
        ]
    )
    print(report)
    RESULTS.mkdir(exist_ok=True)
    name = f"{args.name}-smoke" if args.smoke else args.name
    payload = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "timings_s": timings,
        "teacher": teacher,
        "results": results,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
