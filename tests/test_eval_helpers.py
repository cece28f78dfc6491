"""Shared fixtures of the eval tests: a tiny 3-layer BERT SentenceTransformer and a tiny BEIR folder."""

from __future__ import annotations

import json
from pathlib import Path

from sentence_transformers import SentenceTransformer, models
from transformers import AutoTokenizer, BertConfig, BertModel

TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
TOPICS = {
    "wing": "lift and drag of a swept wing in supersonic flow",
    "heat": "heat transfer through a laminar boundary layer on a flat plate",
    "shell": "buckling of thin cylindrical shells under axial compression",
    "jet": "noise radiated by a turbulent jet exhaust",
}


def make_tiny_model(folder: Path) -> Path:
    """A random 3-layer, 32-wide BERT with mean pooling, saved as a SentenceTransformer checkpoint."""
    import torch

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    hf_dir = folder / "hf"
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean")], device="cpu")
    checkpoint = folder / "tiny-bert"
    model.save(str(checkpoint))
    return checkpoint


def make_beir_folder(folder: Path) -> Path:
    """Four topics x three documents, two queries per topic, graded qrels in test.tsv and train.tsv."""
    folder.mkdir(parents=True)
    docs, queries, test, train = [], [], [], []
    for topic, text in TOPICS.items():
        for i in range(3):
            docs.append({"_id": f"{topic}-{i}", "title": f"{topic} study {i}", "text": f"{text}, part {i}"})
        for i, rows in enumerate((test, train)):
            queries.append({"_id": f"q-{topic}-{i}", "text": f"what is known about {text.split(' of ')[0]}?"})
            rows += [f"q-{topic}-{i}\t{topic}-0\t2", f"q-{topic}-{i}\t{topic}-{1 + i}\t1"]
    for name, rows in (("corpus.jsonl", docs), ("queries.jsonl", queries)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "qrels").mkdir()
    for name, rows in (("test", test), ("train", train)):
        (folder / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return folder
