"""Distillation from a teacher: the recipe's ``distill:`` section, the teacher embedding cache, dataset labelling.

Training never runs the teacher: its embeddings of every text are computed once, stored on disk and put in
the dataset's ``label`` column, shape (n_text_columns, teacher_dim) per row, which is where
sentence-transformers' distillation losses expect their targets (``MSELoss``; Reimers and Gurevych 2020,
"Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation").
``trainer.train.losses.distill.DistillationLoss`` reads them as ``batch.labels``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
from sentence_transformers import SentenceTransformer

from trainer.decoder import decoder_embedder, needs_decoder_modules
from trainer.errors import UserError
from trainer.train.recipe import DistillConfig, ModelConfig

logger = logging.getLogger(__name__)

DATA_FILE = "embeddings.f16"
PROGRESS_FILE = "progress.json"
META_FILE = "meta.json"


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


def model_revision(name: str) -> str:
    """What pins a teacher's weights: file sizes and mtimes of a local folder, else the cached hub commit."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        stamp = "".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)
        return f"path:{path.resolve()}:{hashlib.sha256(stamp.encode()).hexdigest()}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    commit = Path(cached).parent.name if isinstance(cached, str) else "uncached"
    return f"hub:{name}@{commit}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, content: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)


class TeacherEmbeddingCache:
    """Unit-normalised teacher embeddings of a text list, on disk as a float16 memory map.

    One folder per key = sha256(teacher revision, max length, prompt, sorted unique texts), so a later run
    with the same teacher and texts (in any order) reuses it. The build encodes ``chunk_size`` texts at a
    time, flushing the map and then ``progress.json`` after each chunk, so an interrupted build resumes at
    the last finished chunk. ``meta.json`` (row count, dim, sha256 of the data file) is written last; on
    load a missing, unreadable or mismatching ``meta.json`` or data file means a corrupt cache, which is
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
        digest = hashlib.sha256()
        header = [model_revision(self.teacher), self.max_seq_length, self.prompt, len(unique_texts)]
        digest.update(json.dumps(header).encode())
        for text in unique_texts:
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
        return digest.hexdigest()

    def embeddings(self, texts: Sequence[str]) -> tuple[np.memmap, dict[str, int]]:
        """The (n_unique, dim) float16 map of the sorted unique ``texts`` and each text's row in it."""
        unique = sorted(set(texts))
        folder = self.cache_dir / self.key(unique)
        data = self._load(folder, len(unique))
        if data is None:
            data = self._build(folder, unique)
        return data, {text: row for row, text in enumerate(unique)}

    def _load(self, folder: Path, count: int) -> np.memmap | None:
        meta_path, data_path = folder / META_FILE, folder / DATA_FILE
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            expected_size = meta["count"] * meta["dim"] * 2
            valid = (
                meta["count"] == count
                and data_path.is_file()
                and data_path.stat().st_size == expected_size
                and _sha256_file(data_path) == meta["sha256"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            logger.warning("teacher embedding cache %s is corrupt; rebuilding it", folder)
            shutil.rmtree(folder)
            return None
        return np.memmap(data_path, dtype=np.float16, mode="r", shape=(meta["count"], meta["dim"]))

    def _resume_point(self, folder: Path, count: int) -> tuple[int, int | None]:
        """(rows already written, dim) from an interrupted build, or (0, None) to start over."""
        try:
            progress = json.loads((folder / PROGRESS_FILE).read_text())
            rows, dim = int(progress["rows"]), int(progress["dim"])
            size_ok = (folder / DATA_FILE).stat().st_size == count * dim * 2
            if progress["count"] == count and 0 < rows <= count and size_ok:
                return rows, dim
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return 0, None

    def _build(self, folder: Path, texts: list[str]) -> np.memmap:
        folder.mkdir(parents=True, exist_ok=True)
        data_path = folder / DATA_FILE
        done, dim = self._resume_point(folder, len(texts))
        if done:
            logger.info("resuming teacher embedding cache %s at row %d of %d", folder, done, len(texts))
        data = np.memmap(data_path, dtype=np.float16, mode="r+", shape=(len(texts), dim)) if done else None
        for start in range(done, len(texts), self.chunk_size):
            chunk = self._encode(texts[start : start + self.chunk_size])
            if data is None:
                dim = chunk.shape[1]
                data = np.memmap(data_path, dtype=np.float16, mode="w+", shape=(len(texts), dim))
            data[start : start + len(chunk)] = chunk
            data.flush()
            _write_json(folder / PROGRESS_FILE, {"rows": start + len(chunk), "dim": dim, "count": len(texts)})
        del data
        meta = {"count": len(texts), "dim": dim, "sha256": _sha256_file(data_path), "teacher": self.teacher}
        _write_json(folder / META_FILE, meta)
        (folder / PROGRESS_FILE).unlink(missing_ok=True)
        return np.memmap(data_path, dtype=np.float16, mode="r", shape=(len(texts), dim))

    def _teacher_model(self) -> SentenceTransformer:
        if self._model is None:
            self._model = self._loader()
            self._model[0].register_forward_hook(self._count_forward)
        return self._model

    def _count_forward(self, *_: object) -> None:
        self.forward_passes += 1

    def _encode(self, texts: list[str]) -> np.ndarray:
        kwargs = {"prompt": self.prompt} if self.prompt is not None else {}
        embeddings = self._teacher_model().encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, **kwargs
        )
        return embeddings.astype(np.float16)

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
