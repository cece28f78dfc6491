"""End to end: real all-MiniLM-L6-v2 on the cranfield train pairs, and resuming a SIGKILLed run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from tests.conftest import MINILM, REPO, build_tiny_model, requires_shared_data
from trainer.train.recipe import parse_recipe
from trainer.train.run import train

pytestmark = pytest.mark.slow
CELLS = ["L1-D32", "L2-D64", "L4-D128", "L6-D384"]


def test_minilm_on_cranfield_loss_goes_down_and_checkpoint_reloads(tmp_path):
    cranfield = requires_shared_data("cranfield")
    out = tmp_path / "run"
    recipe = parse_recipe(
        {
            "model": {"name": MINILM, "max_seq_length": 64},
            "data": {"train": [{"beir": str(cranfield), "split": "train", "max_samples": 96}]},
            "loss": {"type": "starbucks", "cells": CELLS},
            "training": {
                "output_dir": str(out),
                "max_steps": 6,
                "per_device_train_batch_size": 16,
                "learning_rate": 1e-4,
                "logging_steps": 1,
                "save_steps": 3,
                "report_to": "none",
                "batch_sampler": "no_duplicates",
                "seed": 1,
            },
        }
    )
    trainer = train(recipe)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    for entry in logs:
        assert {f"loss/{c}" for c in CELLS} <= set(entry)
        assert {f"kl/{c}" for c in CELLS[:-1]} <= set(entry)
    first, last = sum(e["loss"] for e in logs[:2]) / 2, sum(e["loss"] for e in logs[-2:]) / 2
    assert last < first
    reloaded = SentenceTransformer(str(out))
    texts = ["flow past a flat plate", "heat transfer in hypersonic flow"]
    assert torch.allclose(
        reloaded.encode(texts, convert_to_tensor=True), trainer.model.encode(texts, convert_to_tensor=True), atol=1e-5
    )
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    manifest = json.loads((out / "elastic_manifest.json").read_text())
    assert manifest["cells"] == CELLS and manifest["base_model"] == MINILM


def _recipe(tiny_model_path, tmp_path, out, max_steps):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"anchor": "question {i}", "positive": "answer {i} {i % 7}"}}\n' for i in range(400)))
    recipe = {
        "model": {"name": str(tiny_model_path)},
        "data": {"train": [{"path": str(pairs)}]},
        "loss": {"type": "starbucks", "cells": ["L1-D8", "L2-D16"]},
        "training": {
            "output_dir": str(out),
            "max_steps": max_steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 5,
            "report_to": "none",
            "seed": 3,
        },
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _losses(out):
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else None
    if state is None:
        last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((last / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}, state["global_step"]


def test_a_sigkilled_run_resumes_and_its_loss_curve_continues(tiny_model_path, tmp_path):
    steps = 40
    reference = tmp_path / "reference"
    cli = [sys.executable, "-m", "trainer", "train"]
    subprocess.run(
        [*cli, str(_recipe(tiny_model_path, tmp_path, reference, steps))], cwd=REPO, check=True, capture_output=True
    )
    out = tmp_path / "killed"
    path = _recipe(tiny_model_path, tmp_path, out, steps)
    process = subprocess.Popen([*cli, str(path)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-10" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / f"checkpoint-{steps}").exists(), "the run finished before the kill"
    subprocess.run([*cli, str(path), "--resume_from_checkpoint", "true"], cwd=REPO, check=True, capture_output=True)
    resumed, global_step = _losses(out)
    expected, expected_steps = _losses(reference)
    assert global_step == expected_steps == steps
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-3), f"step {step}"


def _full_recipe(tiny_model_path, teacher, tmp_path, out, max_steps):
    """2dmse sampling, 1/2-bit heads, distillation from a wider teacher (through a projection) via cached
    teacher labels, gradient caching."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"anchor": "question {i}", "positive": "answer {i} {i % 7}"}}\n' for i in range(400)))
    recipe = {
        "model": {"name": str(tiny_model_path)},
        "data": {"train": [{"path": str(pairs)}]},
        "loss": {
            "type": "2dmse",
            "cells": ["L1-D8", "L2-D16", "L3-D24", "L4-D32"],
            "n_layers_per_step": 1,
            "n_dims_per_step": 1,
            "mini_batch_size": 4,
        },
        "binary": {"bits": [1, 2], "hidden": 16},
        "distill": {"teacher": str(teacher), "cache_dir": str(tmp_path / "teacher-cache")},
        "training": {
            "output_dir": str(out),
            "max_steps": max_steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 5,
            "report_to": "none",
            "seed": 3,
        },
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tensors(folder):
    from safetensors.torch import load_file

    return {
        f"{part}/{name}": tensor
        for part in ("model.safetensors", "binary_heads/model.safetensors", "distill_projection/model.safetensors")
        for name, tensor in load_file(folder / part).items()
    }


def _logged(out):
    """Each step's logged loss and components; sentence-transformers also logs 0.0 for every component seen
    earlier in the run (here: cells 2dmse did not sample this step), which a resumed run has not seen."""
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    return {e["step"]: {k: v for k, v in e.items() if v != 0.0} for e in state["log_history"] if "loss" in e}


def test_the_full_recipe_killed_mid_run_resumes_to_the_same_weights_and_losses(tiny_model_path, tmp_path):
    steps = 30
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # the same threads in all three runs
    cli = [sys.executable, "-m", "trainer", "train"]
    teacher = build_tiny_model(tmp_path / "teacher", layers=2, dim=48, seed=1)
    reference = tmp_path / "reference"
    path = _full_recipe(tiny_model_path, teacher, tmp_path, reference, steps)
    subprocess.run([*cli, str(path)], cwd=REPO, check=True, capture_output=True, env=env)
    out = tmp_path / "killed"
    path = _full_recipe(tiny_model_path, teacher, tmp_path, out, steps)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen([*cli, str(path)], cwd=REPO, env=env, **quiet)
    deadline = time.time() + 600
    while not (out / "checkpoint-10" / "cell_selection.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "checkpoint-30").exists(), "the run finished before the kill"
    resumed = subprocess.run(
        [*cli, str(path), "--resume_from_checkpoint", "true"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, actual = _logged(reference), _logged(out)
    assert sorted(actual) == sorted(expected) == list(range(1, steps + 1))
    assert {"loss/L4-D32", "bin/L4-D32-B2", "cos/L4-D32", "sim/L4-D32-B1"} <= set(expected[1])
    assert len({tuple(sorted(k for k in e if k.startswith("loss/"))) for e in expected.values()}) > 1  # 2dmse
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"
    expected_weights, weights = _tensors(reference), _tensors(out)
    assert set(weights) == set(expected_weights)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
