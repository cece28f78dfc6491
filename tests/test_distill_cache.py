"""Teacher embedding cache, dataset labelling and the recipe section, with the real all-MiniLM-L6-v2 teacher."""

from __future__ import annotations

import json
import logging
import re

import datasets
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.data_collator import BaseDataCollator

from tests.conftest import MINILM
from trainer.errors import UserError
from trainer.grid import Cell, CellSelection, Grid
from trainer.store import META_FILE, PROGRESS_FILE, model_revision
from trainer.train.losses.distill import DistillationLoss
from trainer.train.losses.elastic import ElasticLoss
from trainer.train.losses.infonce import InfoNCELoss
from trainer.train.losses.matryoshka2d import Matryoshka2dLoss
from trainer.train.teacher import (
    MATRIX,
    DistillConfig,
    TeacherEmbeddingCache,
    add_teacher_labels,
    load_teacher,
    teacher_dim,
)

TEXTS = [f"sentence number {i} about {topic}" for i, topic in enumerate(["wings", "flow", "heat", "shock"] * 3)]


@pytest.fixture(scope="module")
def teacher() -> SentenceTransformer:
    return load_teacher(MINILM, max_seq_length=32)


def make_cache(tmp_path, teacher, **kwargs) -> TeacherEmbeddingCache:
    options = {"max_seq_length": 32, "batch_size": 4, "chunk_size": 4} | kwargs
    return TeacherEmbeddingCache(MINILM, tmp_path, loader=lambda: teacher, **options)


def cache_folder(tmp_path):
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return folder


def test_cache_build_shows_its_progress_and_a_reuse_says_so(tmp_path, teacher, capsys, caplog) -> None:
    make_cache(tmp_path, teacher).embeddings(TEXTS)
    progress = capsys.readouterr().err.replace("\r", "\n")
    count = rf"{len(TEXTS)}(\.0)?"  # tqdm's unit_scale writes 12 as 12.0 (and 4,700 as 4.70k)
    assert re.search(rf"teacher cache: 100%.*\| {count}/{count} \[.*text/s\]", progress), progress
    with caplog.at_level(logging.INFO, logger="trainer"):
        make_cache(tmp_path, teacher).embeddings(TEXTS)
    assert f"teacher cache: {len(TEXTS)} texts reused from {cache_folder(tmp_path)}" in caplog.text


def test_teacher_is_frozen(teacher) -> None:
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_cache_matches_teacher_and_second_run_runs_no_forward_pass(tmp_path, teacher) -> None:
    first = make_cache(tmp_path, teacher)
    table, rows = first.embeddings(TEXTS)
    assert first.forward_passes == 3  # 12 texts, batches of 4
    expected = teacher.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = np.asarray(table[[rows[t] for t in TEXTS]], dtype=np.float32)
    assert table.dtype == np.float16 and got.shape == (12, 384)
    np.testing.assert_allclose(got, expected, atol=2e-3)

    second = make_cache(tmp_path, teacher)
    again, rows_again = second.embeddings(list(reversed(TEXTS)) + TEXTS[:3])  # same texts, other order, repeats
    assert second.forward_passes == 0
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(table))
    assert rows_again == rows


def test_cache_key_depends_on_texts_length_and_prompt(tmp_path, teacher) -> None:
    base = make_cache(tmp_path, teacher)
    unique = sorted(set(TEXTS))
    assert base.key(unique) != base.key(unique[:-1])
    assert base.key(unique) != make_cache(tmp_path, teacher, max_seq_length=16).key(unique)
    assert base.key(unique) != make_cache(tmp_path, teacher, prompt="query: ").key(unique)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate_data", "garble_meta"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, teacher, damage) -> None:
    table, _ = make_cache(tmp_path, teacher).embeddings(TEXTS)
    reference = np.array(table)
    folder = cache_folder(tmp_path)
    data = folder / f"{MATRIX}.npy"
    if damage == "flip_bytes":
        raw = bytearray(data.read_bytes())
        raw[-108:-100] = bytes(255 - b for b in raw[-108:-100])  # inside the rows, not the .npy header
        data.write_bytes(bytes(raw))
    elif damage == "truncate_data":
        data.write_bytes(data.read_bytes()[:-2])
    else:
        (folder / META_FILE).write_text("{not json")
    cache = make_cache(tmp_path, teacher)
    rebuilt, _ = cache.embeddings(TEXTS)
    assert cache.forward_passes == 3
    np.testing.assert_array_equal(np.asarray(rebuilt), reference)
    assert json.loads((folder / META_FILE).read_text())["rows"] == len(set(TEXTS))


def test_interrupted_build_resumes_at_last_chunk(tmp_path, teacher) -> None:
    reference, _ = make_cache(tmp_path / "clean", teacher).embeddings(TEXTS)

    class Interrupted(RuntimeError):
        pass

    def stop_on_second_chunk(*_: object) -> None:
        if crashing.forward_passes == 1:  # the hook below runs before the cache's own counter
            raise Interrupted

    crashing = make_cache(tmp_path / "run", teacher)
    hook = teacher[0].register_forward_pre_hook(stop_on_second_chunk)
    try:
        with pytest.raises(Interrupted):
            crashing.embeddings(TEXTS)
    finally:
        hook.remove()
    folder = cache_folder(tmp_path / "run")
    assert json.loads((folder / PROGRESS_FILE).read_text())["done"] == [0]  # the first chunk of 4 texts
    assert not (folder / META_FILE).exists()

    resumed = make_cache(tmp_path / "run", teacher)
    table, _ = resumed.embeddings(TEXTS)
    assert resumed.forward_passes == 2  # chunks 2 and 3 only
    np.testing.assert_array_equal(np.asarray(table), np.asarray(reference))
    assert not (folder / PROGRESS_FILE).exists()


def test_model_revision_pins_hub_commit_and_local_files(tmp_path) -> None:
    assert model_revision(MINILM).startswith(f"hub:{MINILM}@") and not model_revision(MINILM).endswith("uncached")
    (tmp_path / "config.json").write_text("{}")
    before = model_revision(str(tmp_path))
    (tmp_path / "config.json").write_text('{"changed": 1}')
    assert model_revision(str(tmp_path)) != before


def test_config_validation_names_key_and_value() -> None:
    assert DistillConfig(teacher="self").similarity_weight == 200.0
    with pytest.raises(UserError, match=r"distill\.margin: -0\.1 .*>= 0"):
        DistillConfig(teacher="self", margin=-0.1)
    with pytest.raises(UserError, match=r"distill\.teacher: ''"):
        DistillConfig(teacher="")
    with pytest.raises(UserError, match=r"distill\.batch_size: 0 .*positive integer"):
        DistillConfig(teacher="self", batch_size=0)
    with pytest.raises(UserError, match="all 0"):
        DistillConfig(teacher="self", cosine_weight=0, similarity_weight=0, relative_weight=0)
    assert DistillConfig(teacher="self").teacher_name(MINILM) == MINILM
    assert DistillConfig(teacher="other/model").teacher_name(MINILM) == "other/model"


def test_self_teacher_labels_feed_the_elastic_loss(tmp_path) -> None:
    """Labels through the collator into ElasticLoss: the untrained full cell equals its own teacher."""
    config = DistillConfig(teacher="self", max_seq_length=32, cache_dir=str(tmp_path), batch_size=8)
    assert teacher_dim(config, MINILM) == 384
    pairs = datasets.Dataset.from_dict({"anchor": TEXTS[:6], "positive": TEXTS[6:]})
    labelled = add_teacher_labels(pairs, config, ["anchor", "positive"], MINILM)
    assert labelled.column_names == ["anchor", "positive", "label"]
    assert np.asarray(labelled[0]["label"]).shape == (2, 384)
    with pytest.raises(UserError, match="already has a 'label'"):
        add_teacher_labels(labelled, config, ["anchor"], MINILM)
    with pytest.raises(UserError, match="valid columns"):
        add_teacher_labels(pairs, config, ["text"], MINILM)

    student = SentenceTransformer(MINILM, device="cpu")
    student.max_seq_length = 32
    collated = BaseDataCollator(preprocess_fn=student.preprocess)([labelled[i] for i in range(6)])
    assert collated["label"].shape == (6, 2, 384) and collated["label"].dtype == torch.float32
    features = [
        {k[len(c) + 1 :]: v for k, v in collated.items() if k.startswith(f"{c}_")} for c in ("anchor", "positive")
    ]
    cells = (Cell(2, 128), Cell(6, 384))
    terms = {"contrastive": Matryoshka2dLoss(InfoNCELoss()), "distill": DistillationLoss(384, 384)}
    loss = ElasticLoss(student, CellSelection(Grid(cells), cells[-1]), terms)
    with torch.no_grad():
        components = loss(features, collated["label"])
    distill_names = {"cos/L6-D384", "sim/L2-D128", "rel/L2-D128", "sim/L6-D128", "rel/L6-D128"}
    distill_names |= {"sim/L6-D384", "rel/L6-D384"}
    contrastive = {"loss/L2-D128", "loss/L6-D128", "loss/L6-D384", "kl/L2-D128", "kl/L6-D128"}
    assert set(components) == distill_names | contrastive
    assert components["cos/L6-D384"].item() < 10 * 1e-4  # only float16 rounding separates them
    assert components["sim/L2-D128"].item() > 100 * components["sim/L6-D384"].item()
