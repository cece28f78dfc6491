"""The one on-disk embedding cache: row-aligned matrices of a list of texts, written chunk by chunk.

Teacher embeddings (``trainer.train.teacher``), the head-only trainer's layer embeddings
(``trainer.train.head_only``) and the evaluation's per-task layer embeddings (``eval.embeddings``) are all
stores. A store is a folder::

    <folder>/<name>.npy      one (rows, dim) float16 or float32 matrix per name (e.g. per layer), row i = text i
    <folder>/progress.json   while building: the key, the shapes and the chunks already written
    <folder>/meta.json       written last: the key, the shapes and (stores up to HASH_LIMIT bytes) a SHA-256 per file

The key (``text_key``) hashes what was encoded: the caller's identity (model revision, prompt, max length...)
and every text, so a changed input never reuses a stale store. ``build_store`` encodes ``chunk_size`` texts
at a time, writes their rows with ``os.pwrite``, syncs the files and only then records the chunk in
``progress.json``, so an interrupted build resumes at its last complete chunk. Opening checks the key and
every file's size (always) and SHA-256 (when recorded): a damaged store is deleted and rebuilt, with a warning.

Matrices are plain ``.npy`` files (``numpy.load(path, mmap_mode="r")`` maps one). Readers either map them
(``array``), gather a few rows (``take``), or read row ranges with file reads (``read``), which stream a
corpus of any size through a bounded buffer without mapping it.

Several devices: ``devices=["cuda:0", "cuda:1"]`` (or ``["cpu", "cpu"]``) encodes chunks in one spawned
process per entry, like sentence-transformers' multi-process pool (the model moves to the CPU in this
process and each worker moves its copy to its device); the main process writes every chunk it receives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from trainer.errors import UserError

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
HASH_LIMIT = 1 << 30  # bytes; larger stores are checked by size only (hashing 80 GB on every open takes minutes)
DTYPES = ("float32", "float16")

ChunkEncoder = Callable[[list[str]], dict[str, np.ndarray]]


def text_key(identity: object, texts: Sequence[str]) -> str:
    """SHA-256 of ``identity`` (JSON) and of every text in order, each prefixed by its length."""
    digest = hashlib.sha256(json.dumps([identity, len(texts)], sort_keys=True, default=str).encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def model_revision(name: str) -> str:
    """What pins a model's weights: file sizes and mtimes of a local folder, else the cached hub commit."""
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
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, content: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)


def _data_offset(path: Path) -> int:
    """Where the rows of a ``.npy`` file start (after its header)."""
    with path.open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(handle)
        else:
            np.lib.format.read_array_header_2_0(handle)
        return handle.tell()


@dataclass(frozen=True)
class EmbeddingStore:
    """A complete store: ``rows`` rows of each matrix ``dims[name]`` wide, stored as ``dtype``."""

    folder: Path
    rows: int
    dims: dict[str, int]
    dtype: str

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    @classmethod
    def open(
        cls, folder: str | Path, key: str, names: Sequence[str] = (), label: str = "cache"
    ) -> EmbeddingStore | None:
        """The complete store in ``folder`` built for ``key`` with (at least) matrices ``names``, else None.

        A damaged store (unreadable meta, wrong file size or SHA-256) is deleted with a warning; a store of other
        texts or settings, or without some of ``names``, is deleted with an info line; both are then rebuilt.
        """
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            store = cls(folder, int(meta["rows"]), {str(k): int(v) for k, v in meta["dims"].items()}, meta["dtype"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            store, problem = None, f"unreadable {META_FILE} ({type(error).__name__})"
        else:
            problem = store._damage(meta.get("sha256") or {})
        if problem:
            logger.warning("%s %s is damaged (%s); rebuilding it", label, folder, problem)
            shutil.rmtree(folder)
            return None
        missing = sorted(set(names) - set(store.dims))
        if meta.get("key") != key or missing:
            why = f"lacks {missing}" if meta.get("key") == key else "holds other texts or settings"
            logger.info("%s %s %s; rebuilding it", label, folder, why)
            shutil.rmtree(folder)
            return None
        logger.info("%s: %s texts reused from %s", label, f"{store.rows:,}", folder)
        return store

    def _damage(self, hashes: dict[str, str]) -> str:
        """What is wrong with the files ('' when nothing): a size always, a content hash when one was recorded."""
        if self.dtype not in DTYPES:
            return f"dtype {self.dtype!r}"
        for name, dim in self.dims.items():
            path = self.path(name)
            try:
                expected = _data_offset(path) + self.rows * dim * np.dtype(self.dtype).itemsize
            except (OSError, ValueError) as error:
                return f"{path.name} is unreadable ({type(error).__name__})"
            if path.stat().st_size != expected:
                return f"{path.name} has {path.stat().st_size} bytes, expected {expected}"
            if name in hashes and _sha256_file(path) != hashes[name]:
                return f"{path.name} content differs from its SHA-256"
        return ""

    def array(self, name: str) -> np.memmap:
        """The whole (rows, dim) matrix, memory-mapped read-only."""
        return np.load(self.path(name), mmap_mode="r")

    def take(self, name: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """A copy of the given rows (reads only their pages)."""
        return np.asarray(self.array(name)[np.asarray(rows, dtype=np.int64)])

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` read with file reads into a new array (the file is not mapped)."""
        dim, itemsize = self.dims[name], np.dtype(self.dtype).itemsize
        path = self.path(name)
        with path.open("rb") as handle:
            handle.seek(_data_offset(path) + start * dim * itemsize)
            return np.fromfile(handle, dtype=self.dtype, count=(stop - start) * dim).reshape(-1, dim)

    def chunks(self, name: str, rows_per_chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) of every chunk of ``rows_per_chunk`` consecutive rows, in order, each read into a new
        array by file reads through one open file (the file is not mapped): a scan of the whole matrix."""
        dim, path = self.dims[name], self.path(name)
        with path.open("rb") as handle:
            handle.seek(_data_offset(path))
            for start in range(0, self.rows, rows_per_chunk):
                count = (min(start + rows_per_chunk, self.rows) - start) * dim
                yield start, np.fromfile(handle, dtype=self.dtype, count=count).reshape(-1, dim)


class StoreWriter:
    """Writes the chunks of a store in any order; ``finish`` seals it (hashes, meta.json)."""

    def __init__(self, folder: Path, key: str, rows: int, dims: dict[str, int], dtype: str, chunk_size: int) -> None:
        self.folder, self.key, self.rows, self.dims = folder, key, rows, dims
        self.dtype, self.chunk_size = dtype, chunk_size
        self.done: set[int] = set()
        self._offsets: dict[str, int] = {}

    @property
    def chunks(self) -> int:
        return -(-self.rows // self.chunk_size)

    def _progress(self) -> dict:
        return {
            "key": self.key,
            "rows": self.rows,
            "dims": self.dims,
            "dtype": self.dtype,
            "chunk_size": self.chunk_size,
            "done": sorted(self.done),
        }

    @classmethod
    def resume(cls, folder: Path, key: str, rows: int, names: Sequence[str], dtype: str, chunk_size: int):
        """The writer of an interrupted build of exactly this store, or None."""
        try:
            progress = json.loads((folder / PROGRESS_FILE).read_text())
            writer = cls(folder, key, rows, {str(k): int(v) for k, v in progress["dims"].items()}, dtype, chunk_size)
            same = {k: progress[k] for k in ("key", "rows", "dtype", "chunk_size")} == {
                "key": key,
                "rows": rows,
                "dtype": dtype,
                "chunk_size": chunk_size,
            }
            if not same or sorted(writer.dims) != sorted(names):
                return None
            for name, dim in writer.dims.items():
                path = folder / f"{name}.npy"
                writer._offsets[name] = _data_offset(path)
                if path.stat().st_size != writer._offsets[name] + rows * dim * np.dtype(dtype).itemsize:
                    return None
            writer.done = {int(i) for i in progress["done"] if 0 <= int(i) < writer.chunks}
            return writer
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def create_files(self) -> None:
        """A fresh folder with every matrix allocated (sparse) at its full size."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        for name, dim in self.dims.items():
            path = self.folder / f"{name}.npy"
            np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(self.rows, dim))
            self._offsets[name] = _data_offset(path)
        _write_json(self.folder / PROGRESS_FILE, self._progress())

    def write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows of chunk ``index`` for every matrix; durable on disk before the chunk counts as done."""
        start = index * self.chunk_size
        count = min(self.chunk_size, self.rows - start)
        for name, dim in self.dims.items():
            block = np.ascontiguousarray(arrays[name], dtype=self.dtype)
            if block.shape != (count, dim):
                raise ValueError(f"chunk {index} of {name}: shape {block.shape}, expected {(count, dim)}")
            view = memoryview(block).cast("B")
            fd = os.open(self.folder / f"{name}.npy", os.O_WRONLY)
            try:
                position, offset = 0, self._offsets[name] + start * dim * block.itemsize
                while position < len(view):
                    position += os.pwrite(fd, view[position:], offset + position)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.done.add(index)
        _write_json(self.folder / PROGRESS_FILE, self._progress())

    def finish(self) -> EmbeddingStore:
        store = EmbeddingStore(self.folder, self.rows, dict(self.dims), self.dtype)
        size = sum(store.path(name).stat().st_size for name in self.dims)
        hashes = {name: _sha256_file(store.path(name)) for name in self.dims} if size <= HASH_LIMIT else {}
        meta = {"key": self.key, "rows": self.rows, "dims": self.dims, "dtype": self.dtype, "sha256": hashes}
        _write_json(self.folder / META_FILE, meta)
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        return store


def build_store(
    folder: str | Path,
    key: str,
    texts: Sequence[str],
    names: Sequence[str],
    encode: ChunkEncoder,
    dtype: str = "float32",
    chunk_size: int = 4096,
    label: str = "cache",
    devices: Sequence[str] = (),
) -> EmbeddingStore:
    """The store of ``texts`` in ``folder``: reused when complete for ``key``, else encoded (resuming).

    ``encode(texts)`` returns ``{name: (len(texts), dim) array}`` for every name in ``names``. With two or more
    ``devices`` chunks are encoded by one worker process per device (``encode`` must then be picklable and have
    ``to(device)`` returning the encoder on that device, e.g. ``trainer.cell_vectors.LayerEncoder``).
    """
    folder = Path(folder)
    if dtype not in DTYPES:
        raise UserError(f"store dtype: {dtype!r} is not valid; use one of {list(DTYPES)}")
    if not texts:
        raise UserError(f"{label}: there are no texts to encode")
    store = EmbeddingStore.open(folder, key, names, label)
    if store is not None:
        return store
    writer = StoreWriter.resume(folder, key, len(texts), names, dtype, chunk_size)
    if writer is not None and writer.done:
        logger.info("%s: resuming %s at chunk %d of %d", label, folder, len(writer.done) + 1, writer.chunks)
    chunks = -(-len(texts) // chunk_size)
    todo = [i for i in range(chunks) if writer is None or i not in writer.done]
    done_rows = len(texts) - sum(min(chunk_size, len(texts) - i * chunk_size) for i in todo)
    with tqdm(total=len(texts), initial=done_rows, desc=label, unit="text", unit_scale=True) as bar:
        for index, arrays in _encoded_chunks(texts, todo, chunk_size, encode, devices):
            if writer is None:
                dims = {name: int(arrays[name].shape[1]) for name in names}
                writer = StoreWriter(folder, key, len(texts), dims, dtype, chunk_size)
                writer.create_files()
            writer.write(index, arrays)
            bar.update(len(arrays[names[0]]))
    return writer.finish()


def _encoded_chunks(
    texts: Sequence[str], todo: list[int], chunk_size: int, encode: ChunkEncoder, devices: Sequence[str]
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(chunk index, arrays) of every chunk in ``todo``: in this process, or by one worker per device."""

    def chunk(index: int) -> list[str]:
        return list(texts[index * chunk_size : (index + 1) * chunk_size])

    if len(devices) < 2:
        for index in todo:
            yield index, encode(chunk(index))
        return
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    for device in devices:
        queue.put(str(device))
    encode = encode.to("cpu")  # shared with the workers, which move their copy to their device
    with context.Pool(len(devices), initializer=_start_worker, initargs=(encode, queue, len(devices))) as pool:
        pending: deque = deque()
        for index in todo:
            pending.append((index, pool.apply_async(_encode_in_worker, (chunk(index),))))
            if len(pending) >= 2 * len(devices):  # bounded: at most two chunks in flight per worker
                index, result = pending.popleft()
                yield index, result.get()
        while pending:
            index, result = pending.popleft()
            yield index, result.get()


_worker_encode: ChunkEncoder | None = None


def _start_worker(encode, queue, workers: int) -> None:
    """Pool initializer: take one device from the queue and move this worker's encoder to it (CPU workers
    share the cores: torch threads = cores / workers)."""
    global _worker_encode
    device = queue.get()
    if device == "cpu" and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    _worker_encode = encode.to(device)


def _encode_in_worker(texts: list[str]) -> dict[str, np.ndarray]:
    return _worker_encode(texts)
