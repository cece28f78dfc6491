"""Cost per cell in grid.json, the Pareto frontiers, and `eval pick` on a hand-made and on a real grid."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from test_eval_helpers import make_beir_folder, make_tiny_model

import eval.cost
from eval.cli import main
from eval.pick import cell_rows, pareto_front
from trainer.cell_vectors import ExitClock, encode_layers
from trainer.grid import Cell

# cell: (nDCG@10 on task a, on task b, ms per query); the mean quality is the middle of a and b.
HAND_MADE = {
    "L6-D384-B32": (0.40, 0.40, 20.0),
    "L6-D128-B32": (0.37, 0.37, 18.0),
    "L3-D128-B32": (0.33, 0.33, 9.0),
    "L6-D128-B2": (0.30, 0.40, 22.0),  # best mean at 32 bytes
    "L6-D256-B1": (0.36, 0.32, 19.0),  # best at 32 bytes on task a
    "L3-D256-B1": (0.30, 0.30, 8.0),
    "L6-D128-B1": (0.29, 0.29, 18.0),
    "L2-D64-B1": (0.20, 0.20, 5.0),
}


@pytest.fixture
def hand_made(tmp_path) -> Path:
    cells = []
    for name, (a, b, ms) in HAND_MADE.items():
        cell = Cell.parse(name)
        cost = {
            "queries_per_s": 1000 / (ms / 2),
            "docs_per_s": 100.0,
            "search_ms_per_query": ms / 2,
            "ms_per_query": ms,
        }
        cells.append(
            {
                "cell": name,
                "layers": cell.layers,
                "dim": cell.dim,
                "bits": cell.bits,
                "bytes_per_vector": cell.bytes_per_vector,
                "scores": {"a": {"ndcg_at_10": a}, "b": {"ndcg_at_10": b}},
                "cost": {"a": cost, "b": cost},
            }
        )
    grid = {
        "model": "local/demo",
        "checkpoint": "runs/demo",
        "main_metric": "ndcg_at_10",
        "machine": "hand-made",
        "tasks": [{"name": "a", "split": "test"}, {"name": "b", "split": "test"}],
        "cells": cells,
    }
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    return path


def picked(capsys, argv: list[str]) -> list[str]:
    """The ranked cells printed by `eval pick`, and checks each has its exact export command."""
    main(["pick", *argv])
    out = capsys.readouterr().out
    rows = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    for cell in rows:
        assert f"python -m trainer export runs/demo --cell {cell} --out exported/{cell}" in out
    return rows


@pytest.mark.parametrize(
    ("flags", "best"),
    [
        (["--max-bytes", "32"], "L6-D128-B2"),
        (["--max-bytes", "32", "--max-ms-per-query", "20"], "L6-D256-B1"),
        (["--max-bytes", "32", "--max-ms-per-query", "10"], "L3-D256-B1"),
        (["--max-bytes", "32", "--task", "a"], "L6-D256-B1"),
        (["--max-bytes", "600", "--min-ndcg", "0.3"], "L6-D128-B32"),
        ([], "L6-D384-B32"),
    ],
)
def test_pick_returns_the_cell_a_person_would_choose(hand_made, capsys, flags, best):
    assert picked(capsys, [str(hand_made), *flags])[0] == best


def test_pick_lists_every_fitting_cell_best_first_with_its_numbers(hand_made, capsys):
    main(["pick", str(hand_made), "--max-bytes", "16", "--top", "9"])
    out = capsys.readouterr().out
    assert "| 1 | L6-D128-B1 | 0.2900 | 16 | 18.00 | 111 | yes, no |" in out
    assert "| 2 | L2-D64-B1 | 0.2000 | 8 | 5.00 | 400 | yes, yes |" in out
    assert "| 3 |" not in out


def test_nothing_fits_is_one_line_and_exit_2(hand_made, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pick", str(hand_made), "--max-bytes", "32", "--min-ndcg", "0.36"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no cell fits --max-bytes 32 and --min-ndcg 0.36")
    assert "smallest cell is L2-D64-B1 (8 bytes" in err[0] and "best is L6-D384-B32 (1536 bytes" in err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.json"], "does not exist"),
        (["{grid}", "--task", "c"], "--task: 'c' is not in the grid"),
        (["{grid}", "--top", "0"], "--top: 0 is not valid"),
    ],
)
def test_bad_pick_input_exits_2(hand_made, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["pick", *[a.format(grid=hand_made) for a in argv]])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_pareto_frontiers_of_size_and_latency(hand_made):
    rows = cell_rows(json.loads(hand_made.read_text()))
    by_bytes = pareto_front(rows, lambda row: row.bytes_per_vector)
    by_latency = pareto_front(rows, lambda row: row.ms_per_query)
    assert {str(c) for c in by_bytes} == {"L2-D64-B1", "L6-D128-B1", "L6-D128-B2", "L6-D128-B32", "L6-D384-B32"}
    assert {str(c) for c in by_latency} == {"L2-D64-B1", "L3-D256-B1", "L3-D128-B32", "L6-D128-B32", "L6-D384-B32"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root), make_beir_folder(root / "beir")


def test_real_grid_measures_cost_per_cell_and_pick_agrees_with_its_table(tiny, tmp_path, capsys, monkeypatch):
    checkpoint, beir = tiny
    out = tmp_path / "out"
    argv = ["grid", "--model", str(checkpoint), "--tasks", f"{beir}:test", "--layers", "1", "3"]
    argv += ["--dims", "8", "16", "32", "--bits", "32", "1", "2", "--output", str(out)]
    main(argv)
    capsys.readouterr()
    grid = json.loads((out / "grid.json").read_text())
    assert grid["checkpoint"] == str(checkpoint) and "torch threads" in grid["machine"]
    for entry in grid["cells"]:
        cost = entry["cost"]["beir"]
        assert cost["queries_per_s"] > 0 and cost["docs_per_s"] > 0 and cost["search_ms_per_query"] > 0
        assert cost["ms_per_query"] == pytest.approx(1000 / cost["queries_per_s"] + cost["search_ms_per_query"])
        same_layers = [e for e in grid["cells"] if e["layers"] == entry["layers"]]
        assert {e["cost"]["beir"]["queries_per_s"] for e in same_layers} == {cost["queries_per_s"]}
    rows = cell_rows(grid)
    for kind, cost in (("bytes", lambda row: row.bytes_per_vector), ("latency", lambda row: row.ms_per_query)):
        front = pareto_front(rows, cost)
        assert {e["cell"] for e in grid["cells"] if e["pareto"][kind]} == {str(c) for c in front}
    for png in ("pareto.png", "pareto-latency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    fitting = [e for e in grid["cells"] if e["bytes_per_vector"] <= 4]
    table_best = max(fitting, key=lambda e: (e["scores"]["beir"]["ndcg_at_10"], -e["bytes_per_vector"]))
    main(["pick", str(out / "grid.json"), "--max-bytes", "4", "--checkpoint", "runs/demo"])
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |"))
    assert first.split(" | ")[2] == f"{table_best['scores']['beir']['ndcg_at_10']:.4f}"

    def fail(*args, **kwargs):
        raise AssertionError("a rerun on the same machine must reuse costs.json")

    monkeypatch.setattr(eval.cost, "encoding_costs", fail)
    monkeypatch.setattr(eval.cost, "search_ms_per_query", fail)
    main(argv)
    assert json.loads((out / "grid.json").read_text())["cells"] == grid["cells"]


def test_exit_clock_prices_every_exit_from_one_pass(tiny):
    checkpoint, _ = tiny
    model = SentenceTransformer(str(checkpoint), device="cpu")
    blocks = list(model[0].auto_model.encoder.layer)
    texts = ["a short text", "a somewhat longer text here", "x", "another one", "the fifth text of five"]
    plain = encode_layers(model, texts, [1, 3], batch_size=2)
    hooks = [len(block._forward_hooks) for block in blocks]
    ticks = itertools.count()
    clock = ExitClock(skip=1, timer=lambda: float(next(ticks)))
    clocked = encode_layers(model, texts, [1, 3], batch_size=2, clock=clock)
    assert all(torch.equal(plain[layer], clocked[layer]) for layer in (1, 3))
    assert [len(block._forward_hooks) for block in blocks] == hooks  # the clock's hooks are gone
    # Each batch reads the timer at its start (t), after blocks 1..3 (t+1..t+3) and at its end (t+4): exiting
    # at layer l costs l ticks plus half (2 pooled layers) of the 1-tick tail; batches 2 and 3 are counted.
    assert clock.batches == 3 and clock.texts == 3
    assert clock.seconds == {1: 3.0, 2: 5.0, 3: 7.0}
    assert clock.texts_per_second() == {1: 1.0, 2: 3 / 5, 3: 3 / 7}


def test_grid_costs_come_from_its_one_encoding_pass(tiny, tmp_path, monkeypatch):
    checkpoint, beir = tiny
    out = tmp_path / "out"
    argv = ["grid", "--model", str(checkpoint), "--tasks", f"{beir}:test", "--layers", "1", "3"]
    argv += ["--dims", "8", "32", "--bits", "32", "--batch-size", "2", "--output", str(out)]
    samples = []
    real_sample_clock = eval.cost.sample_clock

    def counting(model, texts, batch_size, prompt):
        samples.append(len(texts))
        return real_sample_clock(model, texts, batch_size, prompt)

    monkeypatch.setattr(eval.cost, "sample_clock", counting)
    main(argv)
    assert samples == []  # queries (2 batches, the first one warm-up) and documents were clocked as encoded
    layers = json.loads((out / "costs.json").read_text())["tasks"]["beir-test"]["layers"]
    assert set(layers) == {"1", "3"}
    for role in ("queries_per_s", "docs_per_s"):
        assert layers["1"][role] >= layers["3"][role] > 0  # exiting earlier never costs more, by construction

    (out / "costs.json").unlink()  # the stores are reused: nothing is encoded, so a sample is clocked
    main(argv)
    assert samples == [4, 12]
    assert set(json.loads((out / "costs.json").read_text())["tasks"]["beir-test"]["layers"]) == {"1", "3"}
