"""All terms in one recipe: 2D Matryoshka contrastive, binary codes and distillation, with and without labels."""

import json
import logging
import re

import pytest

from trainer.train.recipe import parse_recipe
from trainer.train.run import train


@pytest.fixture
def beir_folder(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [
        {"_id": f"d{i}", "title": f"title {i}", "text": f"document about topic {i % 5} number {i}"} for i in range(24)
    ]
    queries = [{"_id": f"q{i}", "text": f"what about topic {i % 5}"} for i in range(8)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\nq{i}\td{i + 8}\t1\n" for i in range(8))
    )
    return folder


def recipe(tiny_model_path, tmp_path, sources, **sections):
    return parse_recipe(
        {
            "model": {"name": str(tiny_model_path)},
            "data": {"train": sources},
            "loss": {"type": "starbucks", "cells": ["L2-D16", "L4-D32"], **sections.pop("loss", {})},
            "training": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 3,
                "per_device_train_batch_size": 8,
                "logging_steps": 1,
                "save_strategy": "no",
                "report_to": "none",
            },
            **sections,
        }
    )


def logged_keys(trainer):
    return {key for entry in trainer.state.log_history for key in entry}


def test_label_free_self_distillation_with_codes(tiny_model_path, tmp_path, beir_folder):
    distill = {"teacher": "self", "cache_dir": str(tmp_path / "teacher-cache")}
    trainer = train(
        recipe(
            tiny_model_path,
            tmp_path,
            [{"texts": str(beir_folder)}],
            distill=distill,
            binary={"bits": [1, 2], "hidden": 16},
        )
    )
    keys = logged_keys(trainer)
    assert {"cos/L4-D32", "sim/L2-D16", "rel/L2-D16", "sim/L2-D16-B1", "rel/L4-D32-B2"} <= keys
    assert not any(key.startswith(("loss/", "bin/")) for key in keys)  # one column: nothing to contrast


def test_pairs_and_texts_mixed_with_a_teacher(tiny_model_path, tmp_path, beir_folder, caplog):
    sources = [{"beir": str(beir_folder), "name": "pairs"}, {"texts": str(beir_folder), "name": "texts"}]
    distill = {"teacher": "self", "cache_dir": str(tmp_path / "teacher-cache")}
    run = recipe(tiny_model_path, tmp_path, sources, distill=distill)
    run.training["max_steps"] = 6
    with caplog.at_level(logging.INFO, logger="trainer"):
        keys = logged_keys(train(run))
    assert {"loss/L2-D16", "kl/L2-D16", "cos/L4-D32", "sim/L2-D16"} <= keys
    summary = caplog.text  # the start-of-run summary says what will run, on what, and where it goes
    assert f"model: {tiny_model_path} (4 layers x 32 dims" in summary
    assert "cells (starbucks): last layer" in summary and "earlier L2-D16" in summary
    assert "teacher: self" in summary
    assert re.search(r"data: pairs 16, texts \d+ \(total \d+\) rows", summary), summary
    assert "steps: 6, batch 8 per device" in summary and f"output: {tmp_path / 'run'}" in summary


def test_label_free_texts_without_a_teacher_are_refused(tiny_model_path, tmp_path, beir_folder):
    with pytest.raises(ValueError, match="label-free texts; they need a distill section"):
        recipe(tiny_model_path, tmp_path, [{"texts": str(beir_folder)}])


def test_loss_parameters_get_their_own_learning_rates(tiny_model_path, tmp_path, beir_folder):
    distill = {"teacher": "self", "cache_dir": str(tmp_path / "teacher-cache"), "projection_lr": 5e-3}
    run = recipe(
        tiny_model_path,
        tmp_path,
        [{"beir": str(beir_folder)}],
        distill=distill,
        binary={"bits": [1], "hidden": 16, "lr": 2e-3},
    )
    run.training["learning_rate"] = 1e-5
    trainer = train(run)
    rates = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            rates[id(param)] = group["lr"] if "initial_lr" not in group else group["initial_lr"]
    loss = trainer.loss
    assert {rates[id(p)] for p in loss.heads.parameters()} == {2e-3}
    assert {rates[id(p)] for p in loss.model.parameters()} == {1e-5}
