"""The one embedding store: reuse, keys, resume at the last complete chunk, damage detection, several workers."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

import trainer.store
from trainer.errors import UserError
from trainer.store import META_FILE, PROGRESS_FILE, EmbeddingStore, build_store, text_key

TEXTS = [f"text number {i}" + "!" * (i % 5) for i in range(23)]


class FakeEncoder:
    """Deterministic embeddings of a text (a function of its characters) in two matrices; counts its calls.

    Picklable with ``to(device)``, so it also runs in worker processes; the ``pid`` matrix records which
    process encoded each row."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        self.calls.append(len(texts))
        codes = np.array([[ord(c) for c in (t + " " * 24)[:24]] for t in texts], dtype=np.float32)
        return {"a": codes[:, :8] / 100, "b": codes[:, 8:] / 50, "pid": np.full((len(texts), 1), os.getpid())}

    def to(self, device: str) -> FakeEncoder:
        return self


def build(folder, encoder, texts=TEXTS, key="k", **kwargs) -> EmbeddingStore:
    options = {"chunk_size": 5, "label": "test cache"} | kwargs
    return build_store(folder, key, texts, ["a", "b", "pid"], encoder, **options)


def expected(texts=TEXTS) -> dict[str, np.ndarray]:
    return FakeEncoder()(list(texts))


def test_build_then_reuse_without_encoding(tmp_path, caplog) -> None:
    first = FakeEncoder()
    store = build(tmp_path / "s", first)
    assert first.calls == [5, 5, 5, 5, 3]
    assert store.rows == 23 and store.dims == {"a": 8, "b": 16, "pid": 1}
    np.testing.assert_array_equal(store.array("b"), expected()["b"])
    np.testing.assert_array_equal(store.read("a", 4, 11), expected()["a"][4:11])
    chunks = list(store.chunks("b", 10))
    assert [start for start, _ in chunks] == [0, 10, 20] and [len(rows) for _, rows in chunks] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in chunks]), expected()["b"])
    np.testing.assert_array_equal(store.take("a", [22, 0, 7]), expected()["a"][[22, 0, 7]])
    assert np.load(store.path("a")).shape == (23, 8)  # plain .npy files
    assert not (tmp_path / "s" / PROGRESS_FILE).exists()

    again = FakeEncoder()
    with caplog.at_level(logging.INFO, logger="trainer.store"):
        reused = build(tmp_path / "s", again)
    assert again.calls == [] and reused == store
    assert f"test cache: 23 texts reused from {tmp_path / 's'}" in caplog.text


def test_other_key_or_missing_matrix_rebuilds(tmp_path) -> None:
    build(tmp_path / "s", FakeEncoder())
    other = FakeEncoder()
    build(tmp_path / "s", other, key="other texts")
    assert sum(other.calls) == 23
    wider = FakeEncoder()
    build_store(tmp_path / "s", "other texts", TEXTS, ["a", "c"], lambda t: {**wider(t), "c": np.zeros((len(t), 2))})
    assert sum(wider.calls) == 23


def test_text_key_depends_on_identity_texts_and_order() -> None:
    assert text_key({"model": "m"}, ["a", "b"]) == text_key({"model": "m"}, ["a", "b"])
    assert text_key({"model": "m"}, ["a", "b"]) != text_key({"model": "n"}, ["a", "b"])
    assert text_key({"model": "m"}, ["a", "b"]) != text_key({"model": "m"}, ["b", "a"])
    assert text_key({"model": "m"}, ["ab"]) != text_key({"model": "m"}, ["a", "b"])


def test_interrupted_build_resumes_at_last_complete_chunk(tmp_path) -> None:
    class Interrupted(RuntimeError):
        pass

    class Crashing(FakeEncoder):
        def __call__(self, texts):
            if len(self.calls) == 3:
                raise Interrupted
            return super().__call__(texts)

    with pytest.raises(Interrupted):
        build(tmp_path / "s", Crashing())
    progress = json.loads((tmp_path / "s" / PROGRESS_FILE).read_text())
    assert progress["done"] == [0, 1, 2] and not (tmp_path / "s" / META_FILE).exists()

    resumed = FakeEncoder()
    store = build(tmp_path / "s", resumed)
    assert resumed.calls == [5, 3]  # chunks 3 and 4 only
    np.testing.assert_array_equal(store.array("a"), expected()["a"])
    np.testing.assert_array_equal(store.array("b"), expected()["b"])


def test_changed_settings_do_not_resume_a_partial_build(tmp_path) -> None:
    class Crashing(FakeEncoder):
        def __call__(self, texts):
            if self.calls:
                raise KeyboardInterrupt
            return super().__call__(texts)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", Crashing())
    fresh = FakeEncoder()
    store = build(tmp_path / "s", fresh, chunk_size=4)  # other chunks: start over
    assert sum(fresh.calls) == 23
    np.testing.assert_array_equal(store.array("a"), expected()["a"])


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "garble_meta", "delete_file", "garble_header"])
def test_damaged_store_is_detected_and_rebuilt(tmp_path, caplog, damage) -> None:
    store = build(tmp_path / "s", FakeEncoder())
    path = store.path("b")
    if damage == "flip_bytes":
        raw = bytearray(path.read_bytes())
        raw[-40:-32] = bytes(255 - b for b in raw[-40:-32])
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "garble_meta":
        (tmp_path / "s" / META_FILE).write_text("{not json")
    elif damage == "delete_file":
        path.unlink()
    else:
        path.write_bytes(b"not an npy file" + path.read_bytes()[15:])
    rebuilt = FakeEncoder()
    with caplog.at_level(logging.WARNING, logger="trainer.store"):
        again = build(tmp_path / "s", rebuilt)
    assert sum(rebuilt.calls) == 23 and "is damaged" in caplog.text
    np.testing.assert_array_equal(again.array("b"), expected()["b"])


def test_stores_above_the_hash_limit_are_checked_by_size(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(trainer.store, "HASH_LIMIT", 100)
    store = build(tmp_path / "s", FakeEncoder())
    assert json.loads((tmp_path / "s" / META_FILE).read_text())["sha256"] == {}
    raw = bytearray(store.path("a").read_bytes())
    raw[-8:] = bytes(8)
    store.path("a").write_bytes(bytes(raw))
    assert build(tmp_path / "s", FakeEncoder()) == store  # same size: not detected without a hash
    store.path("a").write_bytes(bytes(raw[:-4]))
    rebuilt = FakeEncoder()
    build(tmp_path / "s", rebuilt)
    assert sum(rebuilt.calls) == 23


def test_float16_store_and_bad_input(tmp_path) -> None:
    store = build(tmp_path / "s", FakeEncoder(), dtype="float16")
    assert store.array("a").dtype == np.float16 and store.read("a", 0, 23).dtype == np.float16
    np.testing.assert_array_equal(store.array("a"), expected()["a"].astype(np.float16))
    with pytest.raises(UserError, match="store dtype: 'int8' is not valid"):
        build(tmp_path / "t", FakeEncoder(), dtype="int8")
    with pytest.raises(UserError, match="no texts"):
        build(tmp_path / "t", FakeEncoder(), texts=[])


class MeetingEncoder(FakeEncoder):
    """Each worker's first call waits until both workers have one, so that both surely take chunks."""

    def __init__(self, barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if not self.calls:
            self.barrier.wait(timeout=300)
        return super().__call__(texts)


def test_two_worker_processes_encode_the_chunks(tmp_path) -> None:
    """``devices=["cpu", "cpu"]``: two spawned workers share the chunks; the main process only writes."""
    import multiprocessing

    barrier = multiprocessing.get_context("spawn").Barrier(2)
    store = build(tmp_path / "s", MeetingEncoder(barrier), devices=["cpu", "cpu"], chunk_size=2)
    pids = {int(p) for p in store.array("pid")[:, 0]}
    assert len(pids) == 2 and os.getpid() not in pids
    np.testing.assert_array_equal(store.array("a"), expected()["a"])
    np.testing.assert_array_equal(store.array("b"), expected()["b"])
