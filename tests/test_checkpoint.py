"""Multi-granularity checkpoints: cell encoders with early exit, cell export, Hub publishing."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from trainer.binary.codes import PackedCodes, sign_codes
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_vector, layer_embeddings
from trainer.cli import main as cli
from trainer.errors import UserError
from trainer.grid import Cell
from trainer.manifest import MANIFEST_NAME
from trainer.serve import publish as publish_module
from trainer.serve.export import export_cell
from trainer.serve.model import load
from trainer.serve.publish import publish
from trainer.train.losses import Matryoshka2dLoss
from trainer.train.losses.binary import BinaryCodeLoss

TEXTS = ["lift of a wing in a slipstream", "boundary layer transition", "heat transfer at mach 6", "shock tubes"]


@pytest.fixture
def checkpoint(tiny_model_path, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_path, folder)
    torch.manual_seed(0)
    heads = BinaryHeads(dims=[16, 32], bits=[1, 2], hidden=16)
    for dim in (16, 32):  # give BatchNorm real running statistics
        heads.encode_float(torch.nn.functional.normalize(torch.randn(64, dim), dim=-1), Cell(1, dim))
    heads.save(folder)
    manifest = {
        "format_version": 1,
        "base_model": "tiny-bert",
        "num_layers": 4,
        "embedding_dim": 32,
        "loss": "starbucks",
        "cells": ["L2-D16", "L4-D32"],
        "bits": [1, 2, 32],
        "recipe": {"data": {"train": [{"hub": "sentence-transformers/all-nli"}]}},
        "loss_class": "ElasticLoss",
        "loss_config": {"mode": "starbucks", "matryoshka": {"scale": 20.0}, "binary": {"bits": [1, 2]}},
        "citation": Matryoshka2dLoss.citation + "\n" + BinaryCodeLoss.citation,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def reference_cell(folder, cell):
    model = SentenceTransformer(str(folder))
    with torch.no_grad():
        layers = layer_embeddings(model, model.preprocess(TEXTS), [cell.layers])
    return cell_vector(layers, cell)


def test_cell_encoder_matches_the_one_pass_cell_embedding(checkpoint):
    elastic = load(checkpoint)
    float_cell = elastic.at("L2-D16").encode(TEXTS)
    np.testing.assert_allclose(float_cell, reference_cell(checkpoint, Cell(2, 16)).numpy(), atol=1e-6)
    codes = elastic.at("L2-D16-B2").encode(TEXTS)
    assert isinstance(codes, PackedCodes) and codes.bits == 2 and codes.dim == 16
    expected = elastic.heads.encode(reference_cell(checkpoint, Cell(2, 16)), Cell(2, 16, 2))
    np.testing.assert_array_equal(codes.packed, expected.packed)
    np.testing.assert_array_equal(elastic.at("L2-D16-B1").encode(TEXTS).packed, codes.at_depth(1).packed)


def test_early_exit_runs_only_the_cell_layers(checkpoint):
    elastic = load(checkpoint)
    blocks = elastic.model[0].auto_model.encoder.layer
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
    elastic.at("L2-D32").encode(TEXTS, batch_size=4)
    assert calls == [1, 1, 0, 0]
    assert len(elastic.model[0].auto_model.encoder.layer) == 4  # restored afterwards


@pytest.mark.parametrize(
    ("cell", "error"),
    [
        ("L2-D16-B4", "bits=4 was not trained"),
        ("L5-D16", "keeps 5 layers"),
        ("L2-D12-B1", "not a multiple of 8"),
        ("L2-D24-B1", "has no binary head"),
    ],
)
def test_cells_the_checkpoint_cannot_serve_are_refused(checkpoint, cell, error):
    with pytest.raises(ValueError, match=error):
        load(checkpoint).at(cell)


def test_a_model_without_heads_serves_sign_bits_and_the_residual_sign_quantiser(tiny_model_path):
    elastic = load(tiny_model_path)
    assert elastic.heads is None
    floats = elastic.at("L2-D16").encode(TEXTS)
    one, two = elastic.at("L2-D16-B1").encode(TEXTS), elastic.at("L2-D16-B2").encode(TEXTS)
    np.testing.assert_array_equal(one.packed, sign_codes(floats).packed)
    # the second plane is the sign of the residual after the first plane's step 1/sqrt(dim)
    residual = floats - np.where(floats > 0, 1.0, -1.0) / np.sqrt(16)
    np.testing.assert_array_equal(two.unpack()[:, 1], residual > 0)
    with pytest.raises(UserError, match="multiple of 8"):
        elastic.at("L2-D12-B1")


@pytest.mark.parametrize("cell", ["L2-D16", "L4-D32-B32", "L2-D16-B1", "L3-D32-B2"])
def test_exported_cell_reloads_as_a_plain_sentence_transformer(checkpoint, tmp_path, cell):
    cell = Cell.parse(cell)
    out = export_cell(checkpoint, cell, tmp_path / "export")
    exported = SentenceTransformer(str(out), trust_remote_code=not cell.is_float)
    assert exported[0].auto_model.config.num_hidden_layers == cell.layers
    assert len(exported[0].auto_model.encoder.layer) == cell.layers
    assert exported.get_embedding_dimension() == cell.dim
    got = exported.encode(TEXTS, convert_to_numpy=True)
    encoder = load(checkpoint).at(cell)
    expected = encoder.encode(TEXTS)
    if not cell.is_float:
        expected = expected.to_float()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    if cell.layers < 4:
        assert (out / "model.safetensors").stat().st_size < (checkpoint / "model.safetensors").stat().st_size


def test_export_never_overwrites(checkpoint, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        export_cell(checkpoint, "L2-D16", out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.fixture
def grid_dir(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    cells = []
    for i, cell in enumerate([Cell(2, 16), Cell(4, 32), Cell(2, 16, 1), Cell(4, 32, 2)]):
        scores = {"cranfield": {"ndcg_at_10": 0.1 + i / 10, "mrr_at_10": 0.2, "recall_at_100": 0.5}}
        cost = {"queries_per_s": 100.0 * (i + 1), "docs_per_s": 50.0, "search_ms_per_query": 0.5, "ms_per_query": 3 + i}
        cells.append(
            {
                "cell": str(cell),
                "layers": cell.layers,
                "dim": cell.dim,
                "bits": cell.bits,
                "bytes_per_vector": cell.bytes_per_vector,
                "scores": scores,
                "cost": {"cranfield": cost},
                "pareto": {"bytes": cell.bits < 32, "latency": i == 0},
            }
        )
    grid = {
        "model": "ckpt",
        "main_metric": "ndcg_at_10",
        "machine": "test machine",
        "tasks": [{"name": "cranfield", "split": "test"}],
        "cells": cells,
    }
    (folder / "grid.json").write_text(json.dumps(grid))
    (folder / "pareto.png").write_bytes(b"\x89PNG fake")
    (folder / "pareto-latency.png").write_bytes(b"\x89PNG fake")
    return folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_writes_exactly_the_upload(checkpoint, grid_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(publish_module, "HfApi", lambda *a, **k: pytest.fail("a dry run must not reach the Hub"))
    files = publish(checkpoint, "my-org/tiny-elastic", grid_dir=grid_dir, dry_run=tmp_path / "dry")
    for name in [
        "README.md",
        "model.safetensors",
        "config.json",
        "modules.json",
        MANIFEST_NAME,
        "grid.json",
        "pareto.png",
        "binary_heads/model.safetensors",
        "binary_heads/config.json",
    ]:
        assert name in files
    card = (tmp_path / "dry" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "sentence-transformers" and meta["base_model"] == "tiny-bert"
    assert {"matryoshka", "2d-matryoshka", "binary-embeddings"} <= set(meta["tags"])
    assert meta["datasets"] == ["sentence-transformers/all-nli"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    grid = json.loads((grid_dir / "grid.json").read_text())
    assert {m["name"]: m["value"] for m in metrics} == {
        f"nDCG@10 ({e['cell']})": e["scores"]["cranfield"]["ndcg_at_10"] for e in grid["cells"]
    }
    for entry in grid["cells"]:  # the servable-cells table: quality, bytes, speed and the Pareto marks
        row = next(line for line in card.splitlines() if line.startswith(f"| {entry['cell']} |")).split(" | ")
        cost = entry["cost"]["cranfield"]
        assert row[2:6] == [
            f"{entry['bytes_per_vector']:g}",
            f"{entry['scores']['cranfield']['ndcg_at_10']:.4f}",
            f"{cost['ms_per_query']:.2f}",
            f"{cost['queries_per_s']:.0f}",
        ]
        assert [mark.strip(" |") for mark in row[6:]] == [
            "★" if entry["pareto"][k] else "" for k in ("bytes", "latency")
        ]
    for citation in (  # from the loss recorded in the manifest, plus sentence-transformers'
        "Sentence-BERT",
        "2D Matryoshka Sentence Embeddings",
        "Starbucks",
        "Binary Embedding-based Retrieval",
        "Matryoshka Representation Learning",
    ):
        assert citation in card
    assert "Jasper and Stella" not in card  # this model was not distilled
    assert "loss:ElasticLoss" in meta["tags"] and '"mode": "starbucks"' in card
    assert "](pareto.png)" in card and "](pareto-latency.png)" in card and "pareto-latency.png" in files
    staged_manifest = json.loads((tmp_path / "dry" / MANIFEST_NAME).read_text())
    assert staged_manifest["evaluation"]["grid"] == "grid.json"
    servable = {entry["cell"]: entry for entry in staged_manifest["servable_cells"]}
    assert set(servable) == {entry["cell"] for entry in grid["cells"]}
    assert servable["L2-D16-B1"]["bytes_per_vector"] == 2 and servable["L2-D16-B1"]["ms_per_query"] == 5
    assert servable["L2-D16-B1"]["pareto"] == {"bytes": True, "latency": False}


def test_sign_code_scores_are_not_listed_as_served_by_trained_heads(checkpoint, grid_dir, tmp_path):
    grid = json.loads((grid_dir / "grid.json").read_text())
    (grid_dir / "grid.json").write_text(json.dumps({**grid, "codes": "sign"}))
    publish(checkpoint, "my-org/tiny-elastic", grid_dir=grid_dir, dry_run=tmp_path / "dry")
    staged_manifest = json.loads((tmp_path / "dry" / MANIFEST_NAME).read_text())
    assert [entry["cell"] for entry in staged_manifest["servable_cells"]] == ["L2-D16-B32", "L4-D32-B32"]


class FakeHfApi:
    calls: list = []

    def __init__(self, *args, **kwargs):
        FakeHfApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, private=False, repo_type=None, exist_ok=False):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, "private": private}))

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        FakeHfApi.calls.append(("upload_folder", {"repo_id": repo_id, "files": files}))


def test_upload_uses_one_commit_and_never_shows_the_token(checkpoint, grid_dir, monkeypatch, capsys, caplog):
    secret = "hf_secretTOKEN0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(publish_module, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    caplog.set_level(logging.DEBUG)
    cli(["publish", str(checkpoint), "--repo-id", "my-org/tiny-elastic", "--private", "--grid", str(grid_dir)])
    kinds = [kind for kind, _ in FakeHfApi.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert FakeHfApi.calls[1][1] == {"repo_id": "my-org/tiny-elastic", "private": True}
    uploaded = FakeHfApi.calls[2][1]
    assert uploaded["repo_id"] == "my-org/tiny-elastic"
    assert {"README.md", "model.safetensors", "binary_heads/model.safetensors", "grid.json"} <= set(uploaded["files"])
    out = capsys.readouterr()
    assert secret not in out.out + out.err + caplog.text
    assert "to my-org/tiny-elastic" in out.out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / MANIFEST_NAME).unlink(), "has no elastic_manifest.json"),
        (lambda f: (f / "model.safetensors").unlink(), "has no model weights"),
        (lambda f: (f / "model.safetensors").write_bytes(b"not safetensors"), "not a readable safetensors"),
        (lambda f: shutil.rmtree(f / "binary_heads"), r"lists bit depths \[1, 2\] but .*binary_heads is missing"),
    ],
)
def test_inconsistent_checkpoints_are_refused(checkpoint, tmp_path, damage, message):
    damage(checkpoint)
    with pytest.raises(UserError, match=message):
        publish(checkpoint, "my-org/x", dry_run=tmp_path / "dry")


def test_joint_training_writes_a_checkpoint_that_serves_every_cell(tiny_model_path, tmp_path):
    from trainer.train.recipe import parse_recipe
    from trainer.train.run import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"anchor": "question {i}", "positive": "answer {i}"}}\n' for i in range(32)))
    out = tmp_path / "run"
    recipe = parse_recipe(
        {
            "model": {"name": str(tiny_model_path)},
            "data": {"train": [{"path": str(pairs)}]},
            "loss": {"type": "starbucks", "cells": ["L2-D16", "L4-D32"]},
            "binary": {"bits": [1, 2], "hidden": 16},
            "training": {
                "output_dir": str(out),
                "max_steps": 3,
                "per_device_train_batch_size": 8,
                "save_steps": 2,
                "logging_steps": 1,
                "report_to": "none",
            },
        }
    )
    trainer = train(recipe)
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"bin/L2-D16-B1", "bin/L2-D16-B2", "binkl/L4-D32-B2", "loss/L2-D16", "kl/L2-D16"} <= logged
    assert (out / "checkpoint-2" / "binary_heads" / "model.safetensors").is_file()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["cells"] == ["L2-D16", "L4-D32"] and manifest["bits"] == [1, 2, 32]
    assert manifest["num_layers"] == 4 and manifest["embedding_dim"] == 32
    assert {"torch", "sentence-transformers", "transformers"} <= set(manifest["packages"])
    assert manifest["recipe"]["binary"]["bits"] == [1, 2]
    codes = load(out).at("L2-D16-B2").encode(TEXTS)
    assert codes.bits == 2 and len(codes) == len(TEXTS)
    assert manifest["loss_class"] == "ElasticLoss" and manifest["loss_config"]["binary"]["bits"] == [1, 2]
    files = publish(out, "my-org/x", dry_run=tmp_path / "dry")
    assert "binary_heads/model.safetensors" in files and not any(f.startswith("checkpoint-") for f in files)
    card = (tmp_path / "dry" / "README.md").read_text()
    assert "Starbucks" in card and "Binary Embedding-based Retrieval" in card and "Jasper" not in card
