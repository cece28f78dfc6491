"""Distillation from a teacher: the recipe's ``distill:`` section, the teacher embedding cache, dataset labelling.

Training never runs the teacher: its embeddings of every text are computed once, stored on disk and put in
the dataset's ``label`` column, shape (n_text_columns, teacher_dim) per row, which is where
sentence-transformers' distillation losses expect their targets (``MSELoss``; Reimers and Gurevych 2020,
"Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation").
``trainer.train.losses.distill.DistillationLoss`` reads them as ``batch.labels``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
from sentence_transformers import SentenceTransformer

from trainer.decoder import decoder_embedder, needs_decoder_modules
from trainer.errors import UserError
from trainer.store import build_store, model_revision, text_key
from trainer.train.recipe import DistillConfig, ModelConfig

MATRIX = "embeddings"


def load_teacher(name: str, max_seq_length: int | None = None, trust_remote_code: bool = False) -> SentenceTransformer:
    """The teacher on CPU (or the default device), frozen: eval mode, no parameter requires a gradient. A plain
    decoder LLM (e.g. the ``self`` teacher of a decoder student) is a last-token embedder (``trainer.decoder``)."""
    config = ModelConfig(name, trust_remote_code=trust_remote_code)
    if needs_decoder_modules(config):
        teacher = decoder_embedder(config)
    else:
        teacher = SentenceTransformer(name, trust_remote_code=trust_remote_code)
    if max_seq_length is not None:
        teacher.max_seq_length = max_seq_length
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_dim(config: DistillConfig, student_model_id: str) -> int:
    """Width of the teacher's embeddings (loads the teacher once, then drops it)."""
    teacher = load_teacher(config.teacher_name(student_model_id), config.max_seq_length, config.trust_remote_code)
    dim = teacher.get_embedding_dimension()
    return int(dim) if dim else int(teacher.encode(["dim"]).shape[-1])


class TeacherEmbeddingCache:
    """Unit-normalised teacher embeddings of a text list: a float16 store (``trainer.store``).

    One store per key = sha256(teacher revision, max length, prompt, sorted unique texts), so a later run
    with the same teacher and texts (in any order) reuses it. The build encodes ``chunk_size`` texts at a
    time and resumes at the last finished chunk; a damaged store is detected on open (sizes, SHA-256),
    deleted and rebuilt. ``forward_passes`` counts the teacher transformer's forward calls of this object.
    """

    def __init__(
        self,
        teacher: str,
        cache_dir: str | Path,
        max_seq_length: int | None = None,
        prompt: str | None = None,
        batch_size: int = 64,
        chunk_size: int = 4096,
        trust_remote_code: bool = False,
        loader: Callable[[], SentenceTransformer] | None = None,
    ) -> None:
        self.teacher, self.cache_dir = teacher, Path(cache_dir).expanduser()
        self.max_seq_length, self.prompt = max_seq_length, prompt
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self._loader = loader or (lambda: load_teacher(teacher, max_seq_length, trust_remote_code))
        self._model: SentenceTransformer | None = None
        self.forward_passes = 0

    @classmethod
    def from_config(cls, config: DistillConfig, student_model_id: str) -> TeacherEmbeddingCache:
        return cls(
            config.teacher_name(student_model_id),
            config.cache_dir,
            config.max_seq_length,
            config.prompt,
            config.batch_size,
            trust_remote_code=config.trust_remote_code,
        )

    def key(self, unique_texts: Sequence[str]) -> str:
        return text_key([model_revision(self.teacher), self.max_seq_length, self.prompt], unique_texts)

    def embeddings(self, texts: Sequence[str]) -> tuple[np.memmap, dict[str, int]]:
        """The (n_unique, dim) float16 map of the sorted unique ``texts`` and each text's row in it."""
        unique = sorted(set(texts))
        key = self.key(unique)
        store = build_store(
            self.cache_dir / key,
            key,
            unique,
            [MATRIX],
            self._encode,
            dtype="float16",
            chunk_size=self.chunk_size,
            label="teacher cache",
        )
        return store.array(MATRIX), {text: row for row, text in enumerate(unique)}

    def _teacher_model(self) -> SentenceTransformer:
        if self._model is None:
            self._model = self._loader()
            self._model[0].register_forward_hook(self._count_forward)
        return self._model

    def _count_forward(self, *_: object) -> None:
        self.forward_passes += 1

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        kwargs = {"prompt": self.prompt} if self.prompt is not None else {}
        embeddings = self._teacher_model().encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, **kwargs
        )
        return {MATRIX: embeddings}

    def release(self) -> None:
        """Drop the loaded teacher (the cache files stay)."""
        self._model = None


def add_teacher_labels(
    dataset: datasets.Dataset,
    config: DistillConfig,
    text_columns: list[str],
    student_model_id: str,
    cache: TeacherEmbeddingCache | None = None,
) -> datasets.Dataset:
    """``dataset`` with a ``label`` column: per row the teacher embeddings of its ``text_columns``, (C, dim) float32.

    The embeddings come from the on-disk cache (built on first use); ``"self"`` resolves to the student's
    starting weights. A dataset that already has a ``label`` column is refused, since the labels would clash.
    """
    missing = [c for c in text_columns if c not in dataset.column_names]
    if not text_columns or missing:
        raise UserError(
            f"distill: text columns {missing or text_columns!r} are not in the dataset; "
            f"valid columns: {dataset.column_names}"
        )
    if "label" in dataset.column_names:
        raise UserError("distill: the dataset already has a 'label' column; distillation writes its own labels")
    cache = cache or TeacherEmbeddingCache.from_config(config, student_model_id)
    texts = [text for column in text_columns for text in dataset[column]]
    table, rows = cache.embeddings(texts)
    cache.release()

    def label(batch: dict[str, list]) -> dict[str, np.ndarray]:
        per_column = [table[[rows[text] for text in batch[column]]] for column in text_columns]
        return {"label": np.stack(per_column, axis=1).astype(np.float32)}

    return dataset.map(label, batched=True, desc="Teacher labels")
