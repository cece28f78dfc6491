"""Two gloo processes on CPU train a tiny model; both finish with identical weights, equal to the saved ones."""

import os
import subprocess
import sys

import pytest
import yaml
from sentence_transformers import SentenceTransformer

from tests.conftest import REPO
from tests.ddp_worker import state_digest

pytestmark = pytest.mark.slow


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
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
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
        str(REPO / "tests" / "ddp_worker.py"),
        str(path),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {p.name: p.read_text() for p in out.glob("rank*.sha256")}
    assert set(digests) == {"rank0-of-2.sha256", "rank1-of-2.sha256"}
    assert len(set(digests.values())) == 1, "the two ranks ended with different weights"
    saved = SentenceTransformer(str(out))
    assert state_digest(saved) == digests["rank0-of-2.sha256"]
    initial = SentenceTransformer(str(tiny_model_path))
    assert state_digest(initial) != digests["rank0-of-2.sha256"], "training did not change the weights"
