"""Grid evaluation at scale: the chunked search equals dense scoring, and the grid equals the former in-memory path.

``InMemorySearch`` below is the grid's scoring before on-disk stores (every layer's embeddings in memory, one
dense queries x documents matrix per cell, ``argpartition`` top-k), kept here as the reference that the
streaming path must reproduce.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import mteb
import numpy as np
import pytest
import torch
from test_eval_helpers import make_tiny_model

import eval.embeddings
import eval.scan
import trainer.cell_vectors
from eval.config import build_request
from eval.runner import GridRequest, cell_meta, run_grid
from eval.scan import code_top_k, float_top_k
from eval.search import CellSearch, ids_of
from eval.tasks import resolve_task, task_texts
from tests.conftest import MINILM, SHARED_DATA
from trainer.binary.codes import code_scores
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_codes, cell_vector, encode_layers
from trainer.errors import UserError
from trainer.grid import Cell, Grid
from trainer.store import EmbeddingStore, build_store

METRICS = ("ndcg_at_10", "map_at_100", "mrr_at_10", "recall_at_100", "recall_at_1000", "precision_at_1")
WORDS = "lift drag wing shock heat flow plate boundary layer jet noise shell buckling panel flutter".split()


class InMemorySearch:
    """The former grid scoring (the reference): dense (queries x documents) scores, ``argpartition`` top-k."""

    def __init__(self, cell: Cell, layers: dict[str, Any], meta: Any, heads: BinaryHeads | None = None) -> None:
        self.cell, self.layers, self.mteb_model_meta, self.heads = cell, layers, meta, heads

    def _float(self, role: str, ids: list[str]) -> torch.Tensor:
        position = {item: i for i, item in enumerate(self.layers[f"{role}_ids"])}
        rows = [position[i] for i in ids]
        return cell_vector({self.cell.layers: self.layers[role][self.cell.layers][rows]}, self.cell.with_bits(32))

    def index(self, corpus: Any, **kwargs: Any) -> None:
        self.doc_ids = ids_of(corpus)
        docs = self._float("doc", self.doc_ids)
        self.docs = docs if self.cell.is_float else cell_codes(docs, self.cell, self.heads)

    def search(self, queries: Any, *, top_k: int, **kwargs: Any) -> dict[str, dict[str, float]]:
        query_ids = ids_of(queries)
        query = self._float("query", query_ids)
        if self.cell.is_float:
            scores = (query @ self.docs.T).numpy()
        else:
            scores = code_scores(cell_codes(query, self.cell, self.heads), self.docs)
        k = min(top_k, scores.shape[1])
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(scores, best, axis=1).tolist()
        return {
            qid: dict(zip([self.doc_ids[j] for j in best[i].tolist()], values[i], strict=True))
            for i, qid in enumerate(query_ids)
        }


def in_memory_layers(model, spec: str, layers: list[int], batch_size: int) -> dict[str, Any]:
    """Every layer of a task's texts in memory, encoded as the former grid did (distinct texts, one call each)."""
    task, split = resolve_task(spec)
    texts = task_texts(task, split)

    def encode(items: list[str]) -> dict[int, torch.Tensor]:
        unique = list(dict.fromkeys(items))
        position = {text: i for i, text in enumerate(unique)}
        encoded = encode_layers(model, unique, layers, batch_size=batch_size)
        return {layer: emb[[position[t] for t in items]] for layer, emb in encoded.items()}

    return {"query": encode(texts.queries), "doc": encode(texts.docs)} | {
        "query_ids": texts.query_ids,
        "doc_ids": texts.doc_ids,
    }


def reference_scores(model, spec: str, cells: list[Cell], batch_size: int) -> dict[Cell, dict[str, float]]:
    layers = in_memory_layers(model, spec, sorted({c.layers for c in cells}), batch_size)
    task, split = resolve_task(spec)
    scores = {}
    for cell in cells:
        search = InMemorySearch(cell, layers, cell_meta("reference", "r", cell, 0))
        result = mteb.evaluate(search, task, cache=None, show_progress_bar=False)
        scores[cell] = {m: round(result.task_results[0].scores[split][0][m], 6) for m in METRICS}  # as saved
    return scores


def make_varied_beir(folder: Path, docs: int = 150, queries: int = 12) -> Path:
    """Documents of 3 to 40 words (so length-sorted batches differ from file order), two with the same text."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) for _ in range(docs)]
    texts[7] = texts[3]  # the same text under two ids
    folder.mkdir(parents=True)
    (folder / "qrels").mkdir()
    corpus = [json.dumps({"_id": f"d{i}", "title": "", "text": t}) for i, t in enumerate(texts)]
    (folder / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    asked = [json.dumps({"_id": f"q{i}", "text": " ".join(rng.choice(WORDS, size=4))}) for i in range(queries)]
    (folder / "queries.jsonl").write_text("\n".join(asked) + "\n")
    judged = [f"q{i}\td{j}\t{1 + j % 2}" for i in range(queries) for j in rng.choice(docs, size=3, replace=False)]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(judged) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_varied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("scale")
    return make_tiny_model(root), f"{make_varied_beir(root / 'varied')}:test"


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many chunks on small corpora: 2 batches per encoding chunk, 40 documents per scan chunk."""
    monkeypatch.setattr(eval.embeddings, "CHUNK_BATCHES", 2)
    monkeypatch.setattr(eval.scan, "chunk_rows", lambda queries, row_floats: 40)
    monkeypatch.setattr(eval.scan, "HAMMING_ROWS", 50)


@pytest.mark.usefixtures("small_chunks")
def test_grid_equals_the_in_memory_path(tiny_varied, tmp_path):
    """Float, 1-bit and 2-bit cells: every metric of the streaming grid equals the former in-memory scoring."""
    from sentence_transformers import SentenceTransformer

    checkpoint, spec = tiny_varied
    grid = Grid.from_spec(layers=[1, 3], dims=[16, 32], bits=[32, 1, 2])
    results = run_grid(GridRequest(str(checkpoint), [spec], grid, tmp_path / "out", batch_size=8))
    model = SentenceTransformer(str(checkpoint), device="cpu")
    expected = reference_scores(model, spec, grid.all_cells(), batch_size=8)
    for cell in grid.all_cells():
        ours = results.scores["varied"][cell]
        assert {m: ours[m] for m in METRICS} == {m: expected[cell][m] for m in METRICS}, cell
    meta = json.loads((tmp_path / "out" / "embeddings" / "varied-test" / "doc" / "meta.json").read_text())
    assert meta["rows"] == 149  # 150 documents, two of them with the same text: one row


def stored(folder: Path, name: str, matrix: np.ndarray, dtype: str = "float32") -> EmbeddingStore:
    """A store holding ``matrix`` as its layer-1 matrix (row i = text str(i))."""
    ids = [str(i) for i in range(len(matrix))]
    return build_store(folder / name, name, ids, ["L1"], lambda b: {"L1": matrix[[int(i) for i in b]]}, dtype=dtype)


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows_per_chunk", [5000, 256], ids=["one-chunk", "256-row-chunks"])
def test_float_top_k_equals_the_dense_product(tmp_path, monkeypatch, dtype, rows_per_chunk):
    """Every dim of a layer from one scan: each cell's k best by the cosine of its cell vectors (up to rounding)."""
    # 256-row chunks: candidates merged across chunks
    monkeypatch.setattr(eval.scan, "chunk_rows", lambda queries, row_floats: rows_per_chunk)
    docs = unit(5000, 48, seed=1)
    store = stored(tmp_path, "docs", docs, dtype)
    layer = torch.from_numpy(unit(30, 48, seed=2))
    results = float_top_k(layer, store, 1, [40, 8, 24, 48], k=25)
    assert sorted(results) == [8, 24, 40, 48]
    for dim, (scores, rows) in results.items():
        cell = Cell(1, dim)
        dense = cell_vector({1: layer}, cell) @ cell_vector({1: torch.from_numpy(docs.astype(dtype))}, cell).T
        expected = dense.topk(25, dim=1)
        torch.testing.assert_close(scores, expected.values, rtol=1e-6, atol=1e-6)
        # the rows found are the k best: their cosines are the k best cosines (ties within rounding aside)
        torch.testing.assert_close(dense.gather(1, rows), expected.values, rtol=1e-6, atol=1e-6)
        assert (rows == expected.indices).float().mean() > 0.99
        assert all(len(set(r)) == 25 for r in rows.tolist())


def test_a_layer_scanned_with_other_dims_ranks_each_dim_as_alone(tmp_path):
    docs = unit(3000, 64, seed=21)
    store = stored(tmp_path, "docs", docs)
    layer = torch.from_numpy(unit(10, 64, seed=22))
    together = float_top_k(layer, store, 1, [16, 32, 64], k=50)
    for dim in (16, 32, 64):
        scores, rows = float_top_k(layer, store, 1, [dim], k=50)[dim]
        torch.testing.assert_close(together[dim][0], scores, rtol=1e-6, atol=1e-6)
        assert (together[dim][1] == rows).float().mean() > 0.99


def test_float_top_k_from_a_sampled_floor_equals_the_dense_product(tmp_path, monkeypatch):
    monkeypatch.setattr(eval.scan, "chunk_rows", lambda queries, row_floats: 256)
    monkeypatch.setattr(eval.scan, "SAMPLE_ROWS", 256)  # a floor for stores of 2,048 documents and more
    docs = unit(5000, 48, seed=11)
    store = stored(tmp_path, "docs", docs)
    cell = Cell(1, 32)
    layer = torch.from_numpy(unit(30, 48, seed=12))
    dense = cell_vector({1: layer}, cell) @ cell_vector({1: torch.from_numpy(docs)}, cell).T
    expected = dense.topk(40, dim=1)
    floor = eval.scan.sampled_floor(layer, store, 1, [32], k=40)[32]
    # about k + 4 sqrt(k N / m) + 8 N / m = 309 documents lie above each floor: never fewer than the k best, never
    # most of the store
    above = (dense.numpy() > floor[:, None]).sum(axis=1)
    assert above.min() > 40 and above.max() < 800
    scans = []
    real_scan = eval.scan._float_scan
    monkeypatch.setattr(eval.scan, "_float_scan", lambda *a: scans.append(a[-1]) or real_scan(*a))
    scores, rows = float_top_k(layer, store, 1, [32], k=40)[32]
    assert len(scans) == 1 and scans[0] is not None
    torch.testing.assert_close(dense.gather(1, rows), expected.values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores, expected.values, rtol=1e-6, atol=1e-6)


def test_queries_whose_floor_was_guessed_too_high_are_searched_again(tmp_path, monkeypatch):
    monkeypatch.setattr(eval.scan, "chunk_rows", lambda queries, row_floats: 700)
    monkeypatch.setattr(eval.scan, "SAMPLE_ROWS", 256)
    docs = unit(5000, 48, seed=13)
    query = torch.from_numpy(unit(4, 48, seed=14))
    # the sampled rows of query 0 all score high, so its guessed floor lets in fewer than k documents
    planted = np.concatenate([np.arange(*run) for run in eval.scan.sample_runs(len(docs))])
    near = query[0].numpy() + 0.3 * unit(len(planted), 48, seed=15)
    docs[planted] = near / np.linalg.norm(near, axis=1, keepdims=True)
    store = stored(tmp_path, "docs", docs)
    scans = []
    real_scan = eval.scan._float_scan
    monkeypatch.setattr(eval.scan, "_float_scan", lambda q, *a: scans.append(len(q)) or real_scan(q, *a))
    scores, rows = float_top_k(query, store, 1, [48], k=300)[48]
    assert scans == [4, 1]  # all queries from their floors, then query 0 again without one
    dense = query @ torch.from_numpy(docs).T
    expected = dense.topk(300, dim=1)
    torch.testing.assert_close(dense.gather(1, rows), expected.values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores, expected.values, rtol=1e-6, atol=1e-6)


def moved_heads(dim: int, bits: list[int]) -> BinaryHeads:
    """Heads moved away from their zero start (as training moves them), so code norms vary per document."""
    torch.manual_seed(0)
    heads = BinaryHeads(dims=[dim], bits=bits, hidden=16)
    with torch.no_grad():
        for module in heads.modules():
            if isinstance(module, torch.nn.Sequential):
                torch.nn.init.normal_(module[-1].weight, std=0.3)
        heads.encode_float(torch.nn.functional.normalize(torch.randn(256, dim), dim=-1), Cell(1, dim, bits[-1]))
    return heads.eval()


@pytest.mark.parametrize(
    ("bits", "dim", "trained"),
    # 48 and 384 bits: widths faiss has no kernel for (padded); 8 x 264: float64 products
    [(1, 64, False), (1, 48, False), (1, 384, True), (2, 64, True), (4, 64, True), (8, 264, False)],
)
def test_code_top_k_equals_code_scores(tmp_path, monkeypatch, bits, dim, trained):
    monkeypatch.setattr(eval.scan, "chunk_rows", lambda queries, row_floats: 500)
    monkeypatch.setattr(eval.scan, "HAMMING_ROWS", 700)
    cell = Cell(1, dim, bits)
    heads = moved_heads(dim, list(range(1, bits + 1))) if trained else None
    docs = unit(3000, dim, seed=3)
    store = stored(tmp_path, "docs", docs)
    queries = torch.from_numpy(unit(20, dim, seed=4))
    query_codes = cell_codes(queries, cell, heads)
    scores, rows = code_top_k(query_codes, store, cell, heads, k=30)
    doc_codes = cell_codes(torch.from_numpy(docs), cell, heads)
    reference = code_scores(query_codes, doc_codes)
    best = -np.sort(-reference, axis=1)[:, :30]
    np.testing.assert_array_equal(scores.numpy(), best)  # exactly code_scores' 30 best, in order
    np.testing.assert_array_equal(np.take_along_axis(reference, rows.numpy(), axis=1), scores.numpy())
    assert all(len(set(r)) == 30 for r in rows.tolist())
    if bits > 1:  # the selection matters: the raw inner product would choose other documents
        raw = query_codes.to_float() @ doc_codes.to_float().T
        assert any(set(np.argsort(-raw[i])[:30]) != set(rows[i].tolist()) for i in range(20))


def test_scan_reads_the_documents_once_in_bounded_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(eval.scan, "chunk_rows", lambda queries, row_floats: 256)
    store = stored(tmp_path, "docs", unit(3000, 32, seed=5))
    reads: list[tuple[int, int]] = []
    real_chunks = EmbeddingStore.chunks

    def chunks(self, name, rows_per_chunk):
        for start, rows in real_chunks(self, name, rows_per_chunk):
            reads.append((start, start + len(rows)))
            yield start, rows

    monkeypatch.setattr(EmbeddingStore, "chunks", chunks)
    chunks_scored: list[tuple[int, int]] = []
    real_add = eval.scan.RunningTopK.add_products

    def add_products(self, products, *args):
        return chunks_scored.append(tuple(products.shape)) or real_add(self, products, *args)

    monkeypatch.setattr(eval.scan.RunningTopK, "add_products", add_products)
    query = torch.from_numpy(unit(7, 32, seed=6))
    for cell in (Cell(1, 32), Cell(1, 32, 1), Cell(1, 32, 2)):
        reads.clear()
        if cell.is_float:  # every float dim of the layer in the same single pass
            float_top_k(query, store, 1, [8, 16, 32], k=10)
        else:
            code_top_k(cell_codes(query, cell, None), store, cell, None, k=10)
        assert reads == [(start, min(start + 256, 3000)) for start in range(0, 3000, 256)]
    assert chunks_scored and all(shape[0] == 7 and shape[1] <= 256 for shape in chunks_scored)  # never 7 x 3000 at once


def test_rescore_reads_only_the_candidates_float_vectors(tmp_path, monkeypatch):
    from eval.embeddings import TaskEmbeddings

    docs, queries = unit(2000, 64, seed=7), unit(3, 64, seed=8)
    ids = [str(i) for i in range(2000)]
    query_rows, doc_rows = {"0": 0, "1": 1, "2": 2}, dict(zip(ids, range(2000), strict=True))
    embeddings = TaskEmbeddings(
        stored(tmp_path, "queries", queries), stored(tmp_path, "docs", docs), query_rows, doc_rows
    )
    heads = moved_heads(64, [1, 2])
    cell = Cell(1, 64, 2)
    taken: list[int] = []
    real_take = EmbeddingStore.take
    monkeypatch.setattr(
        EmbeddingStore, "take", lambda self, n, rows: taken.append(len(rows)) or real_take(self, n, rows)
    )
    search = CellSearch(cell, embeddings, cell_meta("m", "r", cell, 2), heads, rescore=2)
    search.index({"id": ids})
    results = search.search({"id": ["0", "1", "2"]}, top_k=1000)
    assert taken[0] == 3 and 200 <= taken[1] <= 600  # the queries, then the distinct candidates only
    doc_codes = cell_codes(torch.from_numpy(docs), cell, heads)
    codes = code_scores(cell_codes(torch.from_numpy(queries), cell, heads), doc_codes)
    decoded = doc_codes.to_float()
    query = cell_vector({1: torch.from_numpy(queries)}, cell.with_bits(32)).numpy().astype(np.float64)
    for i in range(3):
        hits = results[str(i)]
        assert len(hits) == 200  # RESCORE_K * 2 candidates
        chosen = np.array([int(d) for d in hits])
        assert codes[i, chosen].min() >= np.sort(codes[i])[-200]  # the code-score top 200
        np.testing.assert_array_equal([hits[d] for d in hits], decoded[chosen] @ query[i])


@pytest.mark.usefixtures("small_chunks")
def test_interrupted_encoding_resumes_at_the_last_chunk(tiny_varied, tmp_path, monkeypatch):
    checkpoint, spec = tiny_varied
    request = GridRequest(str(checkpoint), [spec], Grid.from_spec(cells=["L2-D16"]), tmp_path / "o", batch_size=8)
    seen: Counter = Counter()  # texts the stores encode (not the cost measurement's timed samples)
    real = trainer.cell_vectors.LayerEncoder.__call__

    def encode(self, texts):
        if interrupt and sum(seen.values()) >= 12 + 32:  # queries (12), then two document chunks of 16
            raise KeyboardInterrupt
        seen.update(texts)
        return real(self, texts)

    monkeypatch.setattr(trainer.cell_vectors.LayerEncoder, "__call__", encode)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run_grid(request)
    first = Counter(seen)
    seen.clear()
    interrupt = False
    run_grid(request)
    assert sum(seen.values()) == 149 - 32 and not set(seen) & set(first)  # the remaining distinct documents
    assert set(seen.values()) == {1}


def test_two_encoding_processes_give_the_same_grid(tiny_varied, tmp_path):
    checkpoint, spec = tiny_varied
    grid = Grid.from_spec(cells=["L1-D16", "L3-D32"], bits=[32, 1])
    one = run_grid(GridRequest(str(checkpoint), [spec], grid, tmp_path / "one", batch_size=16))
    two = run_grid(GridRequest(str(checkpoint), [spec], grid, tmp_path / "two", batch_size=16, devices=("cpu", "cpu")))
    for cell in grid.all_cells():
        assert one.scores["varied"][cell]["ndcg_at_10"] == pytest.approx(two.scores["varied"][cell]["ndcg_at_10"])
    for role in ("query", "doc"):
        a = np.load(tmp_path / "one" / "embeddings" / "varied-test" / role / "L3.npy")
        b = np.load(tmp_path / "two" / "embeddings" / "varied-test" / role / "L3.npy")
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"store_dtype": "int8"}, "store_dtype: 'int8' is not valid; use one of ['float32', 'float16']"),
        ({"devices": ["gpu0"]}, "devices: 'gpu0' is not a torch device"),
        ({"devices": ["cuda:7"]}, "devices: 'cuda:7' is not available"),
    ],
)
def test_bad_store_settings_name_the_key_and_value(settings, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_request({"model": "m", "tasks": ["t"], **settings}, 3, 32)


@pytest.mark.slow
def test_minilm_cranfield_grid_equals_the_in_memory_path(tmp_path):
    """all-MiniLM-L6-v2 on cranfield, 6 layers x 5 dims x {float, 1 bit, 2 bits}: every cell's nDCG@10, MRR@10 and
    P@1 are the former in-memory path's exactly, and so are the deeper metrics of the code cells (but at depth
    1000: cranfield has 1,400 documents and low-dim codes tie by the hundreds at the 1000th score, where which tied
    documents make the cut is arbitrary, ``argpartition`` before, arrival order now). Float cells are scored a
    layer at a time from the raw prefixes (``eval.scan.float_top_k``), the same cosine up to float32 rounding, so
    two documents whose cosines differ by a rounding error may swap: their deeper metrics agree within 1e-4."""
    from sentence_transformers import SentenceTransformer

    folder = SHARED_DATA / "cranfield"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    spec = f"{folder}:test"
    grid = Grid.from_spec(layers=[1, 2, 3, 4, 5, 6], dims=[32, 64, 128, 256, 384], bits=[32, 1, 2])
    model = SentenceTransformer(MINILM, device="cpu")
    results = run_grid(GridRequest(MINILM, [spec], grid, tmp_path / "out"), model)
    expected = reference_scores(model, spec, grid.all_cells(), batch_size=64)
    exact = {"ndcg_at_10", "mrr_at_10", "precision_at_1"}
    differing = {}
    for cell in grid.all_cells():
        ours, theirs = results.scores["cranfield"][cell], expected[cell]
        for metric in METRICS:
            if metric in exact or (not cell.is_float and not metric.endswith("_at_1000")):
                if ours[metric] != theirs[metric]:
                    differing[str(cell), metric] = (ours[metric], theirs[metric])
            elif cell.is_float and abs(ours[metric] - theirs[metric]) > 1e-4:
                differing[str(cell), metric] = (ours[metric], theirs[metric])
    assert not differing
