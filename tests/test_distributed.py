"""Two gloo processes on CPU (the README's CPU launch) train a tiny model: both finish with identical weights,
equal to the saved ones, and the loss is the one-process loss of the concatenated batch."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from sentence_transformers import SentenceTransformer

from tests.conftest import REPO, build_tiny_model
from tests.ddp_worker import state_digest
from trainer.train.recipe import load_recipe
from trainer.train.run import train

pytestmark = pytest.mark.slow


def launch(recipe, *arguments: str) -> subprocess.CompletedProcess:
    """``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py <recipe>``."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)  # this checkout's trainer, whatever the environment has installed
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *arguments,
        str(REPO / "tests" / "ddp_worker.py"),
        str(recipe),
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_two_cpu_processes_train_identical_weights(tiny_model_path, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"anchor": "question {i}", "positive": "answer {i} of {i}"}}\n' for i in range(64)))
    out = tmp_path / "run"
    recipe = {
        "model": {"name": str(tiny_model_path)},
        "data": {"train": [{"path": str(pairs)}]},
        "loss": {"type": "starbucks", "cells": ["L1-D8", "L2-D16"], "gather_across_devices": True},
        "training": {
            "output_dir": str(out),
            "max_steps": 4,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {p.name: p.read_text() for p in out.glob("rank*.sha256")}
    assert set(digests) == {"rank0-of-2.sha256", "rank1-of-2.sha256"}
    assert len(set(digests.values())) == 1, "the two ranks ended with different weights"
    saved = SentenceTransformer(str(out))
    assert state_digest(saved) == digests["rank0-of-2.sha256"]
    initial = SentenceTransformer(str(tiny_model_path))
    assert state_digest(initial) != digests["rank0-of-2.sha256"], "training did not change the weights"


def test_two_processes_with_heads_distillation_and_caching_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Per process 8 pairs, embedded 4 at a time (gradient caching), 2dmse cells, 1/2-bit heads, distillation
    from a wider teacher through a projection, negatives and in-batch similarities gathered across processes,
    against one process without caching on the 16 pairs of both. Step 1 logs the same value for every term
    (the heads start as the sign quantiser, so their per-process BatchNorm statistics do not change the codes
    yet). After one (unclipped) SGD step the float terms, which depend only on the encoder and the projection, are still
    equal: the averaged gradients are the one-process gradients. After 4 steps the encoder, the heads and the
    projection are identical on both processes. Dropout is off: one process would draw other masks."""
    student = build_tiny_model(tmp_path / "student")
    config = json.loads((student / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (student / "config.json").write_text(json.dumps(config))
    teacher = build_tiny_model(tmp_path / "teacher", layers=2, dim=48, seed=1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"anchor": "question {i}", "positive": "answer {i} of {i % 5}"}}\n' for i in range(64)))
    recipe = {
        "model": {"name": str(student)},
        "data": {"train": [{"path": str(pairs)}]},
        "loss": {
            "type": "2dmse",
            "cells": ["L1-D8", "L2-D16", "L3-D24", "L4-D32"],
            "gather_across_devices": True,
            "mini_batch_size": 4,
        },
        "binary": {"bits": [1, 2], "hidden": 16},
        "distill": {"teacher": str(teacher), "cache_dir": str(tmp_path / "teacher-cache")},
        "training": {
            "output_dir": str(tmp_path / "two"),
            "max_steps": 4,
            "per_device_train_batch_size": 8,
            "optim": "sgd",
            "learning_rate": 0.01,
            "max_grad_norm": 0,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
            "seed": 11,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    one_process = ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "16"]
    trainer = train(load_recipe(path, [*one_process, "--loss.mini_batch_size", "null"]))

    one = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    two = {entry["step"]: entry for entry in json.loads((tmp_path / "two" / "log_history.json").read_text())}
    expected_terms = {"loss/L4-D32", "bin/L4-D32-B2", "binkl/L4-D8-B1", "cos/L4-D32", "sim/L4-D16", "rel/L4-D32-B1"}
    assert expected_terms <= set(one[1])
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-5)
    for step, names in ((1, list(one[1])), (2, [name for name in one[2] if "-B" not in name])):
        for name in names:  # components are logged rounded to 4 decimals
            if "/" in name:
                assert two[step][name] == pytest.approx(one[step][name], abs=1.5e-4), f"step {step}: {name}"
    assert one[2]["loss/L4-D32"] != pytest.approx(one[1]["loss/L4-D32"], abs=1e-2)  # the SGD step changed it
    digests = [json.loads((tmp_path / "two" / f"rank{r}-of-2.json").read_text()) for r in range(2)]
    assert set(digests[0]) == {"encoder", "heads", "projection"}
    assert digests[0] == digests[1], "the two processes ended with different weights"
