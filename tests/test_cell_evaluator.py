"""Per-cell nDCG@10 during training: the recipe section, capped dev sets, the logs and their equality with eval grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_helpers import make_beir_folder

from eval.cli import main as eval_main
from eval.runner import GridRequest, run_grid
from tests.conftest import MINILM, requires_shared_data
from trainer.beir import load_split, write_subset
from trainer.errors import UserError
from trainer.grid import Grid
from trainer.train.recipe import parse_recipe
from trainer.train.run import train

PREFIX = "eval_beir-test_ndcg@10_"


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return make_beir_folder(tmp_path_factory.mktemp("data") / "beir")


def recipe_dict(model: Path, beir: Path, out: Path, **training) -> dict:
    return {
        "model": {"name": str(model)},
        "data": {"train": [{"beir": str(beir), "split": "train"}]},
        "loss": {"type": "starbucks", "cells": ["L2-D16", "L4-D32"]},
        "binary": {"bits": [1, 2], "hidden": 16},
        "evaluation": {"sets": [{"beir": str(beir), "split": "test"}]},
        "training": {
            "output_dir": str(out),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "eval_strategy": "steps",
            "eval_steps": 2,
            "save_steps": 2,
            "logging_steps": 1,
            "report_to": "none",
            "seed": 0,
            **training,
        },
    }


def logged_evaluations(trainer) -> dict[int, dict[str, float]]:
    return {
        entry["step"]: {k: v for k, v in entry.items() if k.startswith("eval_") and "ndcg@10" in k}
        for entry in trainer.state.log_history
        if any("ndcg@10" in key for key in entry)
    }


def grid_scores(checkpoint: Path, task: str, cells: list[str], bits: list[int], output: Path) -> dict[str, float]:
    grid = Grid.from_spec(cells=cells, bits=bits)
    results = run_grid(GridRequest(str(checkpoint), [task], grid, output))
    return {str(cell): scores["ndcg_at_10"] for cell, scores in next(iter(results.scores.values())).items()}


def test_logged_cell_scores_equal_eval_grid_of_each_checkpoint_and_pick_the_best(tiny_model_path, beir, tmp_path):
    out = tmp_path / "run"
    best = f"{PREFIX}L2-D16-B32"
    raw = recipe_dict(tiny_model_path, beir, out, metric_for_best_model=best, load_best_model_at_end=True)
    trainer = train(parse_recipe(raw))
    logged = logged_evaluations(trainer)
    assert sorted(logged) == [2, 4]
    cells = ["L2-D16-B1", "L2-D16-B2", "L2-D16-B32", "L4-D32-B1", "L4-D32-B2", "L4-D32-B32"]  # trained cells x depths
    for step, metrics in logged.items():
        assert set(metrics) == {PREFIX + c for c in cells} | {PREFIX + "mean"}
        expected = grid_scores(out / f"checkpoint-{step}", f"{beir}:test", ["L2-D16", "L4-D32"], [1, 2, 32], tmp_path)
        for cell in cells:
            assert metrics[PREFIX + cell] == pytest.approx(expected[cell], abs=1e-4)
        assert metrics[PREFIX + "mean"] == pytest.approx(sum(expected.values()) / len(cells), abs=1e-4)
    assert logged[2] != logged[4]  # the cells' quality moves while training
    best_step = max(logged, key=lambda step: logged[step][best])
    assert trainer.state.best_metric == logged[best_step][best]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")


def test_several_dev_sets_log_per_set_and_mean_over_sets(tiny_model_path, beir):
    from sentence_transformers import SentenceTransformer

    from eval.cell_evaluator import CellRetrievalEvaluator, dev_set

    model = SentenceTransformer(str(tiny_model_path), device="cpu")
    model.train()
    sets = [dev_set("beir-test", beir, "test"), dev_set("beir-train", beir, "train")]
    evaluator = CellRetrievalEvaluator(sets, Grid.from_spec(cells=["L1-D8", "L4-D32"], bits=[1, 32]))
    metrics = evaluator(model)
    assert model.training  # restored after encoding in eval mode
    cells = ["L1-D8-B1", "L1-D8-B32", "L4-D32-B1", "L4-D32-B32"]
    for cell in cells:
        per_set = [metrics[f"beir-test_ndcg@10_{cell}"], metrics[f"beir-train_ndcg@10_{cell}"]]
        assert metrics[f"ndcg@10_{cell}"] == pytest.approx(sum(per_set) / 2)
    assert metrics["ndcg@10_mean"] == pytest.approx(sum(metrics[f"ndcg@10_{c}"] for c in cells) / 4)
    assert evaluator.primary_metric == "ndcg@10_mean" and len(metrics) == 3 * (len(cells) + 1)


def test_load_best_model_at_end_selects_by_the_primary_cell_by_default(tiny_model_path, beir, tmp_path):
    raw = recipe_dict(tiny_model_path, beir, tmp_path / "run", load_best_model_at_end=True)
    raw["evaluation"]["primary"] = "L2-D16-B1"
    assert parse_recipe(raw).training["metric_for_best_model"] == "eval_beir-test_ndcg@10_L2-D16-B1"


def test_capped_dev_set_is_a_beir_folder_that_keeps_judged_documents(tmp_path):
    folder = requires_shared_data("cranfield")
    split = load_split(folder, "test")
    subset = write_subset(split, "test", tmp_path / "dev", max_queries=20, max_docs=150, seed=3)
    capped = load_split(subset, "test")
    assert len(capped.queries) == 20 and set(capped.queries) <= set(split.queries)
    judged = {doc for qid in capped.queries for doc in split.qrels[qid] if doc in split.corpus}
    assert judged <= set(capped.corpus) and len(capped.corpus) == max(150, len(judged))
    assert all(capped.corpus[doc] == split.corpus[doc] for doc in capped.corpus)
    assert all(
        capped.qrels[qid] == {d: s for d, s in split.qrels[qid].items() if d in capped.corpus} for qid in capped.qrels
    )
    again = write_subset(split, "test", tmp_path / "again", max_queries=20, max_docs=150, seed=3)
    assert (again / "corpus.jsonl").read_text() == (subset / "corpus.jsonl").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["evaluation"].update(sets=[]), "evaluation.sets: empty"),
        (lambda r: r["evaluation"]["sets"][0].update(split="dev"), r"sets\[0\].beir: .*no split 'dev'"),
        (lambda r: r["evaluation"]["sets"][0].update(max_docs=0), r"sets\[0\].max_docs: 0 is not valid"),
        (lambda r: r["evaluation"]["sets"][0].update(splt="test"), r"sets\[0\].splt: unknown key"),
        (lambda r: r["evaluation"].update(cells=["L5-D32"]), "keeps 5 layers but the model has 4"),
        (lambda r: r["evaluation"].update(bits=[4]), "bits=4 was not trained"),
        (lambda r: r["evaluation"].update(cells=["L3-D24"], bits=[1]), "D24 has no binary head|multiple of 8"),
        (lambda r: r["evaluation"].update(primary="L1-D8"), "evaluation.primary: L1-D8-B32 is not scored"),
        (lambda r: r["training"].update(metric_for_best_model="eval_beir-test_ndcg@10_L9"), "is not logged"),
        (lambda r: r["binary"].update(mode="head-only"), "head-only binary training runs no Trainer"),
    ],
)
def test_bad_evaluation_sections_are_refused_before_any_model_loads(tiny_model_path, beir, tmp_path, edit, message):
    raw = recipe_dict(tiny_model_path, beir, tmp_path / "run")
    edit(raw)
    with pytest.raises(UserError, match=message):
        parse_recipe(raw)


@pytest.mark.slow
def test_minilm_demo_run_logs_moving_cell_scores_equal_to_eval_grid_and_pick_chooses_from_it(tmp_path, capsys):
    """Demo-sized: MiniLM on cranfield pairs with a capped cranfield-test dev set, as configs/demo.yaml would run."""
    cranfield = requires_shared_data("cranfield")
    out = tmp_path / "run"
    cells = ["L2-D64", "L6-D384"]
    recipe = parse_recipe(
        {
            "model": {"name": MINILM, "max_seq_length": 64},
            "data": {"train": [{"beir": str(cranfield), "split": "train", "max_samples": 96}]},
            "loss": {"type": "starbucks", "cells": cells},
            "evaluation": {
                "sets": [{"beir": str(cranfield), "split": "test", "max_queries": 30, "max_docs": 300}],
                "bits": [32, 1],
            },
            "training": {
                "output_dir": str(out),
                "max_steps": 6,
                "per_device_train_batch_size": 16,
                "learning_rate": 1e-4,
                "eval_strategy": "steps",
                "eval_steps": 3,
                "save_steps": 3,
                "logging_steps": 3,
                "report_to": "none",
                "seed": 1,
            },
        }
    )
    trainer = train(recipe)
    logged = logged_evaluations(trainer)
    prefix = "eval_cranfield-test_ndcg@10_"
    assert sorted(logged) == [3, 6] and logged[3] != logged[6]
    dev = out / "eval" / "sets" / "cranfield-test"
    grid_dir = tmp_path / "grid"
    eval_main(
        [
            "grid",
            "--model",
            str(out),
            "--tasks",
            f"{dev}:test",
            "--cells",
            *cells,
            "--bits",
            "32",
            "1",
            "--output",
            str(grid_dir),
        ]
    )
    grid = json.loads((grid_dir / "grid.json").read_text())
    for entry in grid["cells"]:
        assert logged[6][prefix + entry["cell"]] == pytest.approx(
            entry["scores"]["cranfield-test"]["ndcg_at_10"], abs=1e-4
        )
    capsys.readouterr()
    eval_main(["pick", str(grid_dir / "grid.json"), "--max-bytes", "64"])
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |"))
    fitting = [e for e in grid["cells"] if e["bytes_per_vector"] <= 64]
    best = max(fitting, key=lambda e: (e["scores"]["cranfield-test"]["ndcg_at_10"], -e["bytes_per_vector"]))
    assert first.split(" | ")[1] == best["cell"]
    assert json.loads((out / "elastic_manifest.json").read_text())["loss_class"] == "ElasticLoss"
