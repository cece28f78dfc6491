"""Distillation where the teacher is better: all-MiniLM-L6-v2 cut to its first layers, with and without a teacher.

At 128 tokens all-mpnet-base-v2 is no better than the 6-layer student on cranfield, cisi and npl, and
distilling from it lowers the flagship's last layer (BENCHMARKS.md section 5). Here the student is cut to its
first ``--layers`` layers (a much weaker model) and the teacher reads its full 384 tokens, so the teacher is
clearly better, and the two arms differ only in distillation (Jasper/Stella cosine, similarity and relative
losses; Zhang et al., 2024, "Jasper and Stella: distillation of SOTA embedding models", arXiv:2412.19048):

- ``contrastive``: configs/flagship.yaml on the cut student, ``loss.layers`` 1..N;
- ``distill``: the same plus distillation from the full-length teacher, the papers' weights (cosine 10,
  similarity 200, relative 20); ``distill-light``: a tenth of each;
- ``untrained``: the cut student as is; ``teacher``: all-mpnet-base-v2 at its full length, its full cell.

    python bench/shallow_student.py                 # seed 42; --seeds 42 43 44 for more
    python bench/shallow_student.py --report        # tabulate what is already evaluated

Runs go to runs/shallow/ (finished runs and evaluations are reused, so it resumes); results to
bench/results/shallow-student.{json,md}: nDCG@10, mean over the test splits of cranfield, cisi and npl (texts
cut at 128 tokens for the students), mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml
from sentence_transformers import SentenceTransformer

from bench.common import RESULTS, provenance
from bench.flagship import RECIPE, STUDENT, TASKS, evaluate, run, scores, summarise, train
from trainer.cell_vectors import keep_layers
from trainer.grid import Cell

TEACHER = "sentence-transformers/all-mpnet-base-v2"
DIMS = ["32", "64", "128", "256", "384"]
DISTILL = {"teacher": TEACHER, "max_seq_length": None, "relative_max_pairs": 512}


def cut_student(layers: int, folder: Path) -> Path:
    """all-MiniLM-L6-v2 keeping its first ``layers`` transformer layers, saved to ``folder`` (once)."""
    if not (folder / "modules.json").is_file():
        model = SentenceTransformer(STUDENT)
        keep_layers(model, layers)
        model.save(str(folder))
    return folder


def arms(student: Path, layers: int) -> dict[str, dict]:
    base = yaml.safe_load(RECIPE.read_text())
    base["model"]["name"] = str(student)
    base["loss"]["layers"] = list(range(1, layers + 1))
    light = {**DISTILL, "cosine_weight": 1.0, "similarity_weight": 20.0, "relative_weight": 2.0}
    return {
        "contrastive": base,
        "distill": {**copy.deepcopy(base), "distill": DISTILL},
        "distill-light": {**copy.deepcopy(base), "distill": light},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3, help="transformer layers the student keeps")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--runs", type=Path, default=Path("runs/shallow"))
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=["contrastive", "distill", "distill-light"],
        default=["contrastive", "distill", "distill-light"],
        help="which arms to train",
    )
    parser.add_argument("--report", action="store_true", help="train and evaluate nothing; tabulate what exists")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    log = args.runs / "log.txt"
    student = cut_student(args.layers, args.runs / "student")
    grid = ["--layers", *map(str, range(1, args.layers + 1)), "--dims", *DIMS]
    results: dict[str, list[dict[str, float]]] = {}
    for name, recipe in arms(student, args.layers).items():
        if name not in args.arms:
            continue
        for seed in args.seeds:
            out = args.runs / name / f"seed{seed}" / "eval"
            if args.report and not (out / "grid-trained.json").is_file():
                continue
            model = train(name, recipe, seed, args.runs, log, [])
            results.setdefault(name, []).append(scores(evaluate(str(model), out, log, grid, TASKS, "trained")))
    untrained = scores(evaluate(str(student), args.runs / "untrained" / "eval", log, grid, TASKS, "trained"))
    teacher_out = args.runs / "teacher" / "eval" / "grid.json"
    if not teacher_out.is_file():  # its full cell at its own length (384 tokens), as it is distilled from
        grid_args = ["--layers", "12", "--dims", "768", "--bits", "32", "--output", str(teacher_out.parent)]
        run([sys.executable, "-m", "eval", "grid", "--model", TEACHER, "--tasks", *TASKS, *grid_args], log)
    teacher = scores(json.loads(teacher_out.read_text()))
    cells = sorted(untrained, key=lambda c: ((cell := Cell.parse(c)).bits, cell.layers, cell.dim))
    rows = {"untrained": [untrained], **results}
    lines = [
        f"Teacher {TEACHER} (full length), L12-D768: {teacher['L12-D768-B32']:.4f}. Student: {STUDENT}'s first "
        f"{args.layers} layers. nDCG@10, mean over cranfield, cisi and npl test; mean ± std over seeds "
        f"({', '.join(f'{name} {len(r)}' for name, r in results.items())}).",
        "",
        "| cell | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for cell in cells:
        values = [summarise([r[cell] for r in runs]) if all(cell in r for r in runs) else "-" for runs in rows.values()]
        lines.append(f"| {cell} | " + " | ".join(values) + " |")
    text = "\n".join(lines)
    print(text)
    payload = {
        **provenance(),
        "seeds": args.seeds,
        "teacher": teacher,
        "untrained": untrained,
        "results": results,
    }
    (RESULTS / "shallow-student.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "shallow-student.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
