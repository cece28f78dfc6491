"""Every layer's embeddings of a task's texts from ONE encoding pass, cached on disk for resumed grids.

Queries and documents are deduplicated and encoded once each with ``trainer.cell_vectors.encode_layers``, which
pools every requested layer from the same forward pass. The cache file holds, per role (``query`` /
``doc``) and layer ``l``, a float32 (N, D) matrix ``<role>.L<l>``; its metadata stores the SHA-256 of the
model identity, the prompts and the texts, and a file whose fingerprint differs is re-encoded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from torch import Tensor

from eval.tasks import TaskTexts
from trainer.cell_vectors import encode_layers

ROLES = ("query", "doc")


@dataclass(frozen=True)
class LayerEmbeddings:
    """Row ``i`` of ``queries[l]`` embeds ``query_ids[i]`` at layer ``l`` (same for documents)."""

    query_ids: list[str]
    doc_ids: list[str]
    queries: dict[int, Tensor]
    docs: dict[int, Tensor]


def _fingerprint(model_id: str, prompts: Sequence[str | None], texts: TaskTexts) -> str:
    digest = hashlib.sha256(json.dumps([model_id, list(prompts)]).encode())
    for text in (*texts.queries, "\0", *texts.docs):
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def encode_unique(
    model: SentenceTransformer, texts: list[str], layers: Sequence[int], batch_size: int, prompt: str | None
) -> dict[int, Tensor]:
    """Encode each distinct text once and scatter the rows back to ``texts`` order."""
    unique = list(dict.fromkeys(texts))
    row = {text: i for i, text in enumerate(unique)}
    encoded = encode_layers(model, unique, layers, batch_size=batch_size, show_progress_bar=True, prompt=prompt)
    index = torch.tensor([row[t] for t in texts], dtype=torch.long)
    return {layer: emb[index].contiguous() for layer, emb in encoded.items()}


def load_or_encode(
    model: SentenceTransformer,
    model_id: str,
    texts: TaskTexts,
    layers: Sequence[int],
    cache_file: Path,
    prompts: tuple[str | None, str | None] = (None, None),
    batch_size: int = 64,
) -> LayerEmbeddings:
    """The cached embeddings of ``layers`` when ``cache_file`` matches, else one encoding pass (then saved)."""
    layers = sorted(set(layers))
    fingerprint = _fingerprint(model_id, prompts, texts)
    tensors: dict[str, Tensor] = {}
    if cache_file.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_file), framework="pt") as handle:
            same = (handle.metadata() or {}).get("fingerprint") == fingerprint
        if same:
            tensors = load_file(str(cache_file))
    if not all(f"{role}.L{layer}" in tensors for role in ROLES for layer in layers):
        tensors = {}
        for role, role_texts, prompt in zip(ROLES, (texts.queries, texts.docs), prompts, strict=True):
            for layer, emb in encode_unique(model, role_texts, layers, batch_size, prompt).items():
                tensors[f"{role}.L{layer}"] = emb
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"fingerprint": fingerprint})
        partial.replace(cache_file)  # atomic: an interrupted save never leaves a truncated cache
    return LayerEmbeddings(
        query_ids=texts.query_ids,
        doc_ids=texts.doc_ids,
        queries={layer: tensors[f"query.L{layer}"] for layer in layers},
        docs={layer: tensors[f"doc.L{layer}"] for layer in layers},
    )
