"""End to end with the CI decoder recipe (configs/tiny-decoder-ci.yaml): a tiny randomly initialised Qwen3-style
decoder trained with LoRA, 2 cells and 1-bit heads through ``python -m trainer train`` on the cranfield train
pairs; as 2 gloo processes; killed and resumed; its exported L2 cell against serving and evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from eval.embeddings import encoding_order
from eval.runner import GridRequest, run_grid
from eval.tasks import resolve_task, task_texts
from tests.conftest import REPO, requires_shared_data
from tests.ddp_worker import state_digest
from tests.test_eval_helpers import make_beir_folder
from tools.tiny_decoder import build_tiny_decoder
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_codes, cell_vector
from trainer.grid import Cell, Grid
from trainer.lora import ADAPTER_WEIGHTS
from trainer.serve.model import load

pytestmark = pytest.mark.slow
RECIPE = REPO / "configs" / "tiny-decoder-ci.yaml"
TRAIN = [sys.executable, "-m", "trainer", "train", str(RECIPE)]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def decoder_path(tmp_path_factory):
    requires_shared_data("cranfield")
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder") / "base")


def overrides(decoder_path, out, *extra: str) -> list[str]:
    return ["--model.name", str(decoder_path), "--output_dir", str(out), *extra]


def test_trained_decoder_cell_is_the_same_exported_served_and_evaluated(decoder_path, tmp_path):
    out = tmp_path / "run"
    subprocess.run([*TRAIN, *overrides(decoder_path, out)], cwd=REPO, env=ENV, check=True, capture_output=True)
    assert (out / ADAPTER_WEIGHTS).is_file() and (out / "binary_heads").is_dir()
    export = [sys.executable, "-m", "trainer", "export", str(out), "--cell", "L2-D32", "--out", str(tmp_path / "L2")]
    subprocess.run(export, cwd=REPO, env=ENV, check=True, capture_output=True)

    beir = make_beir_folder(tmp_path / "beir")
    grid = Grid.from_spec(cells=["L2-D32"], bits=[32, 1])
    run_grid(GridRequest(str(out), [f"{beir}:test"], grid, tmp_path / "eval"))
    (stores,) = (tmp_path / "eval" / "embeddings").iterdir()
    texts = task_texts(*resolve_task(f"{beir}:test"))
    queries, docs = texts.queries, texts.docs
    evaluated = {}  # layer 2 as the grid stored it, rows back in the order of the texts mteb hands the model
    for role, role_texts in (("query", queries), ("doc", docs)):
        row = {text: i for i, text in enumerate(encoding_order(role_texts))}
        matrix = np.load(stores / role / "L2.npy")
        evaluated[f"{role}.L2"] = torch.from_numpy(matrix[[row[text] for text in role_texts]])

    exported = SentenceTransformer(str(tmp_path / "L2"), device="cpu")  # plain: no peft, no remote code
    assert (tmp_path / "L2" / "model.safetensors").is_file() and not (tmp_path / "L2" / ADAPTER_WEIGHTS).exists()
    served = load(out).at("L2-D32")
    plain_query, plain_doc = exported.encode_query(queries), exported.encode_document(docs)
    np.testing.assert_allclose(served.encode_query(queries), plain_query, atol=1e-5)
    np.testing.assert_allclose(served.encode_document(docs), plain_doc, atol=1e-5)
    evaluated_query = cell_vector({2: evaluated["query.L2"]}, Cell(2, 32))
    evaluated_doc = cell_vector({2: evaluated["doc.L2"]}, Cell(2, 32))
    np.testing.assert_allclose(evaluated_query.numpy(), plain_query, atol=1e-5)
    np.testing.assert_allclose(evaluated_doc.numpy(), plain_doc, atol=1e-5)
    assert not np.allclose(exported.encode(queries), plain_query, atol=1e-3)  # the query prompt took part

    heads = BinaryHeads.load(out)
    codes = load(out).at("L2-D32-B1").encode_query(queries)
    np.testing.assert_array_equal(codes.packed, cell_codes(evaluated_query, Cell(2, 32, 1), heads).packed)


def test_two_gloo_processes_train_the_decoder_adapters_identically(decoder_path, tmp_path):
    out = tmp_path / "run"
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
        str(RECIPE),
        *overrides(decoder_path, out, "--max_steps", "3", "--save_steps", "100"),
    ]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {p.name: p.read_text() for p in out.glob("rank*.sha256")}
    assert set(digests) == {"rank0-of-2.sha256", "rank1-of-2.sha256"}
    assert len(set(digests.values())) == 1, "the two ranks ended with different weights"
    saved = SentenceTransformer(str(out), device="cpu")  # base model + the saved adapters
    assert state_digest(saved) == digests["rank0-of-2.sha256"]
    base = SentenceTransformer(str(decoder_path), device="cpu")[0].auto_model.state_dict()
    for name, tensor in saved[0].auto_model.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(tensor, base[name.replace(".base_layer", "")], atol=0, rtol=0, msg=name)


def losses(out) -> tuple[dict[int, float], int]:
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}, state["global_step"]


def test_a_sigkilled_lora_run_resumes_and_its_loss_curve_continues(decoder_path, tmp_path):
    steps = ["--max_steps", "12", "--save_steps", "4"]
    reference = tmp_path / "reference"
    subprocess.run(
        [*TRAIN, *overrides(decoder_path, reference, *steps)], cwd=REPO, env=ENV, check=True, capture_output=True
    )
    out = tmp_path / "killed"
    command = [*TRAIN, *overrides(decoder_path, out, *steps)]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "checkpoint-12").exists(), "the run finished before the kill"
    assert (out / "checkpoint-4" / ADAPTER_WEIGHTS).is_file()
    subprocess.run([*command, "--resume_from_checkpoint", "true"], cwd=REPO, env=ENV, check=True, capture_output=True)
    resumed, global_step = losses(out)
    expected, expected_steps = losses(reference)
    assert global_step == expected_steps == 12
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-3), f"step {step}"
    reference_model = SentenceTransformer(str(reference), device="cpu")
    resumed_model = SentenceTransformer(str(out), device="cpu")
    texts = ["flow past a flat plate", "heat transfer in hypersonic flow"]
    np.testing.assert_allclose(resumed_model.encode(texts), reference_model.encode(texts), atol=1e-4)
