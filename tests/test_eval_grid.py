"""The grid path against plain mteb, the one-pass encoding, resume, binary scoring, outputs and bad input."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import mteb
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from test_eval_helpers import make_beir_folder, make_tiny_model

import eval.runner
import trainer.cell_vectors
from eval.cli import main
from eval.embeddings import TaskEmbeddings
from eval.runner import GridRequest, run_grid
from eval.search import CellSearch
from eval.tasks import resolve_task, task_texts
from trainer.errors import UserError
from trainer.grid import Cell, Grid
from trainer.store import build_store

SHARED_CRANFIELD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cranfield"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root), make_beir_folder(root / "beir")


def truncated_model(path: str, layers: int, dim: int) -> SentenceTransformer:
    """A plain SentenceTransformer that runs only the first ``layers`` layers and keeps ``dim`` dims."""
    model = SentenceTransformer(path, device="cpu", truncate_dim=dim)
    encoder = model[0].auto_model.encoder
    encoder.layer = encoder.layer[:layers]
    model[0].auto_model.config.num_hidden_layers = layers
    return model


def plain_ndcg(model: SentenceTransformer, task_spec: str) -> float:
    task, split = resolve_task(task_spec)
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 64})
    return result.task_results[0].scores[split][0]["ndcg_at_10"]


def count_encodes(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Texts the grid's stores encode (the cost measurement's timed samples are not counted)."""
    seen: Counter = Counter()
    real = trainer.cell_vectors.LayerEncoder.__call__

    def counting(self, texts):
        seen.update(texts)
        return real(self, texts)

    monkeypatch.setattr(trainer.cell_vectors.LayerEncoder, "__call__", counting)
    return seen


def stored(folder: Path, layer: int, query_ids, queries: torch.Tensor, doc_ids, docs: torch.Tensor) -> TaskEmbeddings:
    """In-memory layer embeddings written as the two stores of a task (row i = id i)."""

    def store(role: str, ids: list[str], matrix: torch.Tensor):
        position = {item: i for i, item in enumerate(ids)}

        def encode(batch: list[str]) -> dict:
            return {f"L{layer}": matrix[[position[item] for item in batch]].numpy()}

        return build_store(folder / role, role, ids, [f"L{layer}"], encode, chunk_size=7)

    rows = {item: i for i, item in enumerate(query_ids)}, {item: i for i, item in enumerate(doc_ids)}
    return TaskEmbeddings(store("query", query_ids, queries), store("doc", doc_ids, docs), *rows)


def test_grid_ndcg_equals_plain_mteb_on_truncated_model(tiny, tmp_path):
    checkpoint, beir = tiny
    spec = f"{beir}:test"
    grid = Grid.from_spec(cells=["L1-D16", "L2-D32", "L3-D8"])
    results = run_grid(GridRequest(str(checkpoint), [spec], grid, tmp_path / "out"))
    for cell in grid.cells:
        ours = results.scores["beir"][cell]["ndcg_at_10"]
        assert ours == pytest.approx(
            plain_ndcg(truncated_model(str(checkpoint), cell.layers, cell.dim), spec), abs=1e-4
        )


def test_each_text_encoded_once_for_the_whole_grid(tiny, tmp_path, monkeypatch):
    checkpoint, beir = tiny
    seen = count_encodes(monkeypatch)
    grid = Grid.from_spec(layers=[1, 2, 3], dims=[8, 16, 32], bits=[1, 32])
    results = run_grid(GridRequest(str(checkpoint), [f"{beir}:test"], grid, tmp_path / "out"))
    assert results.scored_cells == 18
    assert set(seen.values()) == {1}  # every query and document text went through the encoder exactly once
    assert len(seen) == 12 + 4  # 12 documents, 4 judged test queries


def test_interrupted_grid_resumes_without_reencoding_or_rescoring(tiny, tmp_path, monkeypatch):
    checkpoint, beir = tiny
    request = GridRequest(
        str(checkpoint), [f"{beir}:test"], Grid.from_spec(layers=[1, 3], dims=[8, 32], bits=[1, 32]), tmp_path / "o"
    )
    scored: list[Cell] = []
    real_search = CellSearch.search

    def interrupt_third(self, queries, **kwargs):
        if len(scored) == 3:
            raise KeyboardInterrupt
        scored.append(self.cell)
        return real_search(self, queries, **kwargs)

    monkeypatch.setattr(CellSearch, "search", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run_grid(request)
    first_pass = list(scored)
    monkeypatch.setattr(CellSearch, "search", real_search)
    real_ranked = eval.runner.ranked  # scored cells, not the cost measurement's timed searches (eval.cost)
    monkeypatch.setattr(
        eval.runner, "ranked", lambda search, *a, **kw: scored.append(search.cell) or real_ranked(search, *a, **kw)
    )
    seen = count_encodes(monkeypatch)
    results = run_grid(request)
    assert not seen  # embeddings came from the cache
    assert results.scored_cells == 8 - 3
    assert set(scored[3:]).isdisjoint(first_pass) and len(scored[3:]) == 5
    assert len(list((tmp_path / "o" / "results").rglob("beir.json"))) == 8


def test_grid_starts_with_a_summary_of_its_work(tiny, tmp_path, caplog):
    checkpoint, beir = tiny
    texts = task_texts(*resolve_task(f"{beir}:test"))
    grid = Grid.from_spec(cells=["L1-D8", "L3-D32"], bits=[32, 1])
    with caplog.at_level(logging.INFO, logger="eval"):
        run_grid(GridRequest(str(checkpoint), [f"{beir}:test"], grid, tmp_path / "o"))
    summary = caplog.records[0].getMessage()
    assert "cells: 4 (2 float, 2 codes: trained)" in summary
    assert f"{len(texts.query_ids):,} queries, {len(texts.doc_ids):,} documents" in summary
    assert f"output: {tmp_path / 'o'}" in summary


def test_changed_judgments_are_rescored_not_reused(tiny, tmp_path):
    import shutil

    checkpoint, beir = tiny
    folder = shutil.copytree(beir, tmp_path / "beir")
    grid = Grid.from_spec(cells=["L1-D8", "L3-D32"])
    request = GridRequest(str(checkpoint), [f"{folder}:test"], grid, tmp_path / "o")
    assert run_grid(request).scored_cells == 2
    assert run_grid(request).scored_cells == 0
    qrels = folder / "qrels" / "test.tsv"
    qrels.write_text("\n".join(qrels.read_text().splitlines()[:-1]) + "\n")  # drop one judgment
    assert run_grid(request).scored_cells == 2


def test_binary_cells_score_by_the_code_rule_and_rescore_by_float_query(tmp_path):
    torch.manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(20, 16), dim=-1)
    from eval.runner import cell_meta

    ids = [f"d{i}" for i in range(20)]
    emb = stored(tmp_path, 1, ids[:5], docs[:5], ids, docs)
    cell = Cell(1, 16, 1)
    search = CellSearch(cell, emb, cell_meta("m", "r", cell, 0))
    search.index({"id": ids})
    result = search.search({"id": ids[:5]}, top_k=20)
    signs = (docs > 0).numpy()
    for i in range(5):
        hamming = (signs[i] != signs).sum(axis=1)
        expected = {ids[j]: float(16 - 2 * hamming[j]) / 16 for j in range(20)}  # cosine of +-1 codes
        assert result[ids[i]] == pytest.approx(expected)
    rescored = CellSearch(cell, emb, cell_meta("m", "r", cell, 2), rescore=2)
    rescored.index({"id": ids})
    top = rescored.search({"id": ids[:5]}, top_k=3)
    for i in range(5):
        assert len(top[ids[i]]) == 20  # min(RESCORE_K * 2, 20 documents) candidates, all re-scored
        for doc, score in top[ids[i]].items():
            j = ids.index(doc)
            assert score == pytest.approx(float(np.dot(docs[i].numpy(), np.where(signs[j], 1.0, -1.0))), abs=1e-5)


def test_mteb_mock_task_runs_through_the_grid(tiny, tmp_path):
    checkpoint, _ = tiny
    grid = Grid.from_spec(cells=["L1-D8", "L3-D32"], bits=[1, 32])
    results = run_grid(GridRequest(str(checkpoint), ["MockRetrievalTask"], grid, tmp_path / "out"))
    assert results.tasks == {"MockRetrievalTask": "test"}
    assert all(0 <= s["ndcg_at_10"] <= 1 for s in results.scores["MockRetrievalTask"].values())


def test_cli_writes_results_table_and_plots_from_yaml_config(tiny, tmp_path, capsys):
    checkpoint, beir = tiny
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {checkpoint}\ntasks: ['{beir}:test']\nlayers: [1, 3]\ndims: [8, 16, 32]\nbits: [32]\n")
    out = tmp_path / "out"
    main(["grid", "--config", str(config), "--bits", "1", "32", "--output", str(out)])  # flag overrides bits
    grid = json.loads((out / "grid.json").read_text())
    assert {"model", "revision", "num_layers", "embedding_dim", "tasks", "cells"} <= set(grid)
    assert grid["num_layers"] == 3 and grid["embedding_dim"] == 32
    assert len(grid["cells"]) == 2 * 3 * 2
    one = next(c for c in grid["cells"] if c["cell"] == "L3-D16-B1")
    assert one["bytes_per_vector"] == 2 and one["layers"] == 3
    assert {"ndcg_at_10", "mrr_at_10", "recall_at_100"} <= set(one["scores"]["beir"])
    table = (out / "table-B1.md").read_text()
    assert "| L3 |" in table and "| layers \\ dims | 8 | 16 | 32 |" in table
    assert (out / "table-B32.md").is_file()
    for png in ("heatmap-beir.png", "pareto.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "12 cells scored" in capsys.readouterr().out
    main(["grid", "--config", str(config), "--bits", "1", "32", "--output", str(out)])
    assert "0 cells scored, 12 reused" in capsys.readouterr().out


def test_cells_typed_with_their_bits_are_scored_exactly_as_listed(tiny, tmp_path):
    checkpoint, beir = tiny
    out = tmp_path / "out"
    main(
        [
            "grid",
            "--model",
            str(checkpoint),
            "--tasks",
            f"{beir}:test",
            "--cells",
            "L3-D16-B1,L1-D8",
            "--output",
            str(out),
        ]
    )
    grid = json.loads((out / "grid.json").read_text())
    assert [entry["cell"] for entry in grid["cells"]] == ["L3-D16-B1", "L1-D8-B32"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "SciFactt"], "did you mean SciFact"),
        (["--tasks", "MockClassificationTask"], "only retrieval tasks"),
        (["--tasks", "{beir}:dev"], "no split 'dev'; available splits: ['test', 'train']"),
        (["--tasks", "{empty}:test"], "corpus.jsonl is empty"),
        (["--cells", "L4-D32"], "the model has 3"),
        (["--cells", "L2-D64"], "embeds in 32"),
        (["--bits", "40"], "bits must be 1..16"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_keeps_results(tiny, tmp_path, capsys, flags, message):
    checkpoint, beir = tiny
    empty = make_beir_folder(tmp_path / "empty")
    (empty / "corpus.jsonl").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.json").write_text("kept")
    base = {"--tasks": [f"{beir}:test"], "--cells": ["L1-D8"], "--bits": ["32"]}
    base[flags[0]] = [f.format(beir=beir, empty=empty) for f in flags[1:]]
    argv = ["grid", "--model", str(checkpoint), "--output", str(out)] + [x for k, v in base.items() for x in (k, *v)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # other lines: loading bars
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert (out / "grid.json").read_text() == "kept"
    assert not (out / "results").exists()


def test_grid_ranks_a_multi_bit_cell_exactly_by_the_code_score(tmp_path):
    """500 documents, top 10: the grid's ranking of a 2-bit cell of trained heads is code_scores' ranking."""
    from eval.runner import cell_meta
    from trainer.binary.codes import code_scores
    from trainer.binary.heads import BinaryHeads

    torch.manual_seed(0)
    heads = BinaryHeads(dims=[32], bits=[1, 2], hidden=16)
    with torch.no_grad():
        for module in heads.modules():  # a head moved away from its zero start, as training moves it
            if isinstance(module, torch.nn.Sequential):
                torch.nn.init.normal_(module[-1].weight, std=0.3)
        heads.encode_float(torch.nn.functional.normalize(torch.randn(256, 32), dim=-1), Cell(2, 32))  # BatchNorm
    heads.eval()
    docs = torch.nn.functional.normalize(torch.randn(500, 32), dim=-1)
    queries = torch.nn.functional.normalize(docs[:40] + 0.3 * torch.randn(40, 32), dim=-1)
    doc_ids, query_ids = [f"d{i}" for i in range(500)], [f"q{i}" for i in range(40)]
    cell = Cell(2, 32, 2)
    search = CellSearch(
        cell, stored(tmp_path, 2, query_ids, queries, doc_ids, docs), cell_meta("m", "r", cell, 0), heads
    )
    search.index({"id": doc_ids})
    result = search.search({"id": query_ids}, top_k=10)
    scores = code_scores(heads.encode(queries, cell), heads.encode(docs, cell))
    raw = heads.encode(queries, cell).to_float() @ heads.encode(docs, cell).to_float().T
    differs = 0
    for i, qid in enumerate(query_ids):
        assert result[qid] == pytest.approx({d: scores[i, doc_ids.index(d)] for d in result[qid]})
        tenth = np.sort(scores[i])[-10]
        assert all(scores[i, doc_ids.index(d)] >= tenth - 1e-12 for d in result[qid])
        differs += set(np.argsort(-raw[i])[:10]) != set(np.argsort(-scores[i])[:10])
    assert differs > 0  # the raw inner product would have selected other candidates


def test_trained_heads_serve_multi_bit_cells_and_refuse_untrained_ones(tiny, tmp_path):
    import shutil

    from trainer.binary.heads import BinaryHeads

    checkpoint, beir = tiny
    with_heads = tmp_path / "with-heads"
    shutil.copytree(checkpoint, with_heads)
    BinaryHeads(dims=[16, 32], bits=[1, 2], hidden=8).save(with_heads)
    grid = Grid.from_spec(cells=["L2-D16", "L3-D32"], bits=[1, 2])
    results = run_grid(GridRequest(str(with_heads), [f"{beir}:test"], grid, tmp_path / "out"))
    assert Cell(3, 32, 2).bytes_per_vector == 8
    assert all(0 <= results.scores["beir"][c]["ndcg_at_10"] <= 1 for c in grid.all_cells())
    sign = run_grid(GridRequest(str(with_heads), [f"{beir}:test"], grid, tmp_path / "out", codes="sign"))
    plain = run_grid(GridRequest(str(checkpoint), [f"{beir}:test"], grid, tmp_path / "plain"))
    metrics = ("ndcg_at_10", "mrr_at_10", "recall_at_100")

    def ranked(results):
        return {cell: [scores[m] for m in metrics] for cell, scores in results.scores["beir"].items()}

    assert ranked(sign) == ranked(plain)  # --codes sign ignores the trained heads
    for cells, bits, message in ((["L1-D8"], [1], "no binary head"), (["L1-D16"], [4], "serve depths")):
        request = GridRequest(str(with_heads), [f"{beir}:test"], Grid.from_spec(cells=cells, bits=bits), tmp_path / "o")
        with pytest.raises(UserError, match=message):
            run_grid(request)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CRANFIELD.is_dir(), reason="../shared/data/cranfield is absent (real data not mounted)")
def test_minilm_cranfield_grid_equals_plain_mteb(tmp_path):
    name, spec = "sentence-transformers/all-MiniLM-L6-v2", f"{SHARED_CRANFIELD}:test"
    grid = Grid.from_spec(cells=["L3-D128", "L6-D384"], bits=[1, 32])
    results = run_grid(GridRequest(name, [spec], grid, tmp_path / "out"))
    scores = results.scores["cranfield"]
    assert scores[Cell(6, 384)]["ndcg_at_10"] == pytest.approx(0.372, abs=5e-4)  # README reference figure
    assert scores[Cell(3, 128)]["ndcg_at_10"] == pytest.approx(
        plain_ndcg(truncated_model(name, 3, 128), spec), abs=1e-4
    )


def test_our_text_formatting_equals_mteb_dataloaders():
    """eval.tasks owns how documents and queries are written out; it must be exactly what mteb hands a model."""
    from datasets import Dataset
    from mteb._create_dataloaders import _retrieval_texts  # private, used here only as the reference
    from mteb.types import PromptType

    from eval.tasks import document_texts, query_texts

    corpus = Dataset.from_dict(
        {
            "id": ["a", "b", "c", "d"],
            "title": ["Wing lift", "", "  spaced  ", "Shock"],
            "text": ["in a slipstream ", " boundary layers", "heat transfer", ""],
        }
    )
    assert document_texts(corpus) == list(_retrieval_texts(corpus, PromptType.document))
    plain = Dataset.from_dict({"id": ["q1", "q2"], "text": ["what is lift?", " drag "]})
    assert query_texts(plain, "t") == list(_retrieval_texts(plain, PromptType.query))
    instructed = plain.add_column("instruction", ["Answer briefly.", None])
    assert query_texts(instructed, "t") == list(_retrieval_texts(instructed, PromptType.query))
