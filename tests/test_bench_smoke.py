"""CI runs a seconds-long smoke of each benchmark: the scripts run and write their result files."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, requires_shared_data


def smoke(name: str, *flags: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, f"bench/{name}.py", "--smoke", *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def recorded(name: str) -> dict:
    return json.loads((REPO / "bench" / "results" / f"{name}-smoke.json").read_text())


@pytest.mark.parametrize("name", ["binary_search", "early_exit", "train_step", "decoder_memory"])
def test_benchmark_smoke_runs_and_records_provenance(name):
    smoke(name)
    payload = recorded(name)
    assert payload["smoke"] is True and payload["rows"] and payload["machine"] and payload["command"]


def test_grid_scale_smoke_times_every_cell():
    smoke("grid_scale")
    payload = recorded("grid_scale")
    assert payload["smoke"] is True and payload["machine"] and payload["command"]
    rows = payload["rows"]
    cells = [row for row in rows if row["cell"] != "summary" and not row.get("layer scan")]
    scans = [row for row in rows if row.get("layer scan")]
    assert len(cells) == 12 and all(row["s"] > 0 and row["GB/s scanned"] > 0 for row in cells)
    assert all(row["of matmul"] > 0 for row in cells if not row["cell"].endswith("-B1"))
    # the grid's way: each of the smoke grid's 2 layers scanned once for both its float dims
    assert [row["cell"] for row in scans] == ["L1-D32..D384-B32", "L6-D32..D384-B32"]
    assert all(row["s"] > 0 and row["of matmul"] > 0 for row in scans)


def test_memory_benchmark_smoke():
    smoke("train_step", "--peak-memory")
    assert all(row["peak RSS MiB"] > 50 for row in recorded("train_memory")["rows"])


def test_batch_scaling_benchmark_smoke():
    smoke("train_step", "--batch-scaling")
    rows = recorded("train_batch")["rows"]
    assert [(row["batch"], row["mini_batch_size"]) for row in rows] == [(4, "-"), (4, 2)]  # uncached, cached
    assert all(row["peak RSS MiB"] > 50 and row["s/example"] > 0 for row in rows)


@pytest.mark.slow
def test_grid_eval_benchmark_smoke():
    requires_shared_data("cranfield")
    smoke("grid_eval")
    row = recorded("grid_eval")["rows"][0]
    assert row["grid_s"] > 0 and row["full_model_s"] > 0


def test_flagship_held_out_recipe_drops_that_collection_and_nothing_else():
    from bench.flagship import COLLECTIONS, RECIPE, held_out_recipe

    base = yaml.safe_load((REPO / RECIPE).read_text())
    names = [source["name"] for source in base["data"]["train"]]
    for collection in COLLECTIONS:
        kept = [source["name"] for source in held_out_recipe(base, collection)["data"]["train"]]
        assert kept == [name for name in names if name != f"{collection}-pairs"]
    assert [source["name"] for source in base["data"]["train"]] == names  # the published recipe is untouched
