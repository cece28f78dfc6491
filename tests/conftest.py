"""Shared fixtures: a tiny BERT sentence-transformer built in the test (no download) and the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_LAYERS, TINY_DIM = 4, 32


def requires_shared_data(name: str) -> Path:
    """The BEIR folder ../shared/data/<name>, or skip saying where it should be."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: this test reads the shared BEIR data beside the checkout")
    return folder


def build_tiny_model(folder: Path, layers: int = TINY_LAYERS, dim: int = TINY_DIM, seed: int = 0) -> Path:
    """A randomly initialised BERT (MiniLM's tokenizer) wrapped as Transformer + mean Pooling + Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * dim,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    transformer = Transformer(str(folder / "hf"), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(dim, "mean"), Normalize()])
    model.save(str(folder / "st"))
    return folder / "st"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_model(tiny_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_path))
