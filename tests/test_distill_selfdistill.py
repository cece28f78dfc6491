"""Label-free self-distillation makes all-MiniLM-L6-v2 elastic: its L2 and L4 cells gain nDCG@10 on cranfield."""

from __future__ import annotations

import time

import datasets
import pytest
import pytrec_eval
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from tests.conftest import MINILM, requires_shared_data
from trainer.beir import BeirSplit, load_split
from trainer.cell_vectors import encode_layers
from trainer.grid import Cell, CellSelection, Grid
from trainer.train.losses.distill import DistillationLoss
from trainer.train.losses.elastic import ElasticLoss
from trainer.train.teacher import DistillConfig, add_teacher_labels, teacher_dim

CELLS = (Cell(2, 128), Cell(4, 256), Cell(6, 384))
DOC_LENGTH, QUERY_LENGTH, TRAIN_LENGTH = 128, 64, 64


def ndcg_at_10(model: SentenceTransformer, split: BeirSplit) -> dict[str, float]:
    """Mean nDCG@10 (pytrec_eval's ndcg_cut_10, graded qrels) of each cell, cosine over the whole corpus."""
    doc_ids, query_ids = list(split.corpus), list(split.queries)
    layers = {cell.layers for cell in CELLS}
    model.max_seq_length = DOC_LENGTH
    docs = encode_layers(model, [split.corpus[i] for i in doc_ids], layers)
    model.max_seq_length = QUERY_LENGTH
    queries = encode_layers(model, [split.queries[i] for i in query_ids], layers)
    evaluator = pytrec_eval.RelevanceEvaluator(split.qrels, {"ndcg_cut.10"})
    result = {}
    for cell in CELLS:
        d = F.normalize(docs[cell.layers][:, : cell.dim], dim=-1)
        q = F.normalize(queries[cell.layers][:, : cell.dim], dim=-1)
        top = (q @ d.T).topk(100, dim=1)
        run = {
            qid: {doc_ids[j]: float(score) for score, j in zip(top.values[row], top.indices[row], strict=True)}
            for row, qid in enumerate(query_ids)
        }
        per_query = evaluator.evaluate(run).values()
        result[cell.name2d] = sum(m["ndcg_cut_10"] for m in per_query) / len(per_query)
    return result


@pytest.mark.slow
def test_label_free_self_distillation_lifts_small_cells_and_keeps_full_cell(tmp_path, pytestconfig) -> None:
    folder = requires_shared_data("cranfield")
    test_split = load_split(folder, "test")
    texts = list(test_split.corpus.values()) + list(load_split(folder, "train").queries.values())  # no labels used
    start = time.time()
    model = SentenceTransformer(MINILM, device="cpu")
    before = ndcg_at_10(model, test_split)

    config = DistillConfig(
        teacher="self", max_seq_length=TRAIN_LENGTH, cache_dir=str(pytestconfig.cache.mkdir("teacher-embeddings"))
    )
    dataset = add_teacher_labels(datasets.Dataset.from_dict({"text": texts}), config, ["text"], MINILM)
    term = DistillationLoss(
        384,
        teacher_dim(config, MINILM),
        config.cosine_weight,
        config.similarity_weight,
        config.relative_weight,
        config.margin,
        config.relative_max_pairs,
    )
    loss = ElasticLoss(model, CellSelection(Grid(CELLS), CELLS[-1], "starbucks"), {"distill": term})
    model.max_seq_length = TRAIN_LENGTH
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        learning_rate=3e-5,
        max_steps=60,
        warmup_steps=6,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    torch.manual_seed(0)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    after = ndcg_at_10(model, test_split)
    print(f"\nnDCG@10 cranfield test, before {before}, after {after}, {time.time() - start:.0f}s")

    for cell in ("L2-D128", "L4-D256"):
        assert after[cell] > before[cell], f"{cell}: {before[cell]:.4f} -> {after[cell]:.4f}"
    assert after["L6-D384"] > before["L6-D384"] - 0.01, "self-distillation must not harm the full cell"
