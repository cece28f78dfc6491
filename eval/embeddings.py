"""Every layer's embeddings of a task's texts from ONE encoding pass, in on-disk stores for resumed grids.

Queries and documents are deduplicated and encoded once each with ``trainer.cell_vectors.encode_layers``
(through ``LayerEncoder``), which pools every requested layer from the same forward pass, into two stores
(``trainer.store``) under ``<folder>/query`` and ``<folder>/doc``: one ``L<l>`` matrix per layer, one row per
distinct text. Rows are in encoding order (longest text first, as ``encode_layers`` and sentence-transformers
batch), and chunks are whole batches, so each text is encoded in exactly the batch an in-memory pass over all
texts would give it. A store is keyed by the model identity, prompt, max length, dtype and texts; an
interrupted encoding resumes at its last complete chunk; ``devices`` encodes on several devices at once.
Each role's ``ExitClock`` times every layer exit of the chunks this process encoded (``eval.cost``); the first
batch the grid encodes is the warm-up and is not timed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from eval.tasks import TaskTexts
from trainer.cell_vectors import ExitClock, LayerEncoder, layer_name
from trainer.store import EmbeddingStore, build_store, text_key

ROLES = {"query": "queries", "doc": "documents"}  # store folder -> what the progress bar calls it
CHUNK_BATCHES = 64  # encoding batches per store chunk: the granularity of a resumed encoding


@dataclass(frozen=True)
class TaskEmbeddings:
    """Row ``query_rows[id]`` of matrix ``L<l>`` of ``queries`` embeds query ``id`` at layer ``l`` (same for docs);
    ``clocks`` (queries, documents) timed the layer exits of what was encoded now (nothing, for reused stores)."""

    queries: EmbeddingStore
    docs: EmbeddingStore
    query_rows: dict[str, int]
    doc_rows: dict[str, int]
    clocks: tuple[ExitClock, ExitClock] = field(default_factory=lambda: (ExitClock(), ExitClock()))

    def query_vectors(self, layer: int, ids: Sequence[str]) -> np.ndarray:
        return self.queries.take(layer_name(layer), [self.query_rows[i] for i in ids])


def encoding_order(texts: Sequence[str]) -> list[str]:
    """The distinct texts, longest first (a stable sort, like ``encode_layers``' batches)."""
    return sorted(dict.fromkeys(texts), key=lambda text: -len(text))


def encode_role(
    model: SentenceTransformer,
    model_id: str,
    folder: Path,
    role: str,
    ids: Sequence[str],
    texts: Sequence[str],
    prompt: str | None,
    clock: ExitClock,
    *,
    layers: Sequence[int],
    batch_size: int,
    dtype: str,
    devices: Sequence[str],
) -> tuple[EmbeddingStore, dict[str, int]]:
    """The store ``folder/role`` of one role's texts (reused, resumed or encoded) and each id's row in it;
    ``clock`` times the chunks encoded in this process."""
    rows = encoding_order(texts)
    identity = {"model": model_id, "prompt": prompt, "max_seq_length": model.max_seq_length, "dtype": dtype}
    key = text_key(identity, rows)
    store = build_store(
        folder / role,
        key,
        rows,
        [layer_name(layer) for layer in layers],
        LayerEncoder(model, tuple(layers), batch_size, prompt, clock),
        dtype=dtype,
        chunk_size=batch_size * CHUNK_BATCHES,
        label=f"{folder.name} {ROLES[role]}",
        devices=devices,
    )
    row_of = {text: i for i, text in enumerate(rows)}
    return store, {i: row_of[text] for i, text in zip(ids, texts, strict=True)}


def load_or_encode(
    model: SentenceTransformer,
    model_id: str,
    texts: TaskTexts,
    layers: Sequence[int],
    folder: Path,
    prompts: tuple[str | None, str | None] = (None, None),
    batch_size: int = 64,
    dtype: str = "float32",
    devices: Sequence[str] = (),
) -> TaskEmbeddings:
    """The stores of ``layers`` for the task's queries and documents under ``folder``, encoded when missing."""
    layers = sorted(set(layers))
    encode = partial(
        encode_role, model, model_id, folder, layers=layers, batch_size=batch_size, dtype=dtype, devices=devices
    )
    query_clock = ExitClock(skip=1)
    queries, query_rows = encode("query", texts.query_ids, texts.queries, prompts[0], query_clock)
    doc_clock = ExitClock(skip=0 if query_clock.batches else 1)  # encoded queries warmed the model up
    docs, doc_rows = encode("doc", texts.doc_ids, texts.docs, prompts[1], doc_clock)
    return TaskEmbeddings(queries, docs, query_rows, doc_rows, (query_clock, doc_clock))
