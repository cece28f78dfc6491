"""Training data as ``datasets``: (anchor, positive[, negative...]) pairs, or one ``text`` column.

Sources are hub datasets, local files, BEIR folders (query, relevant document pairs) or raw texts; several
sources become a ``DatasetDict``, which sentence-transformers' Trainer samples from batch by batch.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError

from trainer import beir
from trainer.errors import UserError
from trainer.train.recipe import SourceConfig

PAIR_COLUMNS = ("anchor", "positive")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


def _check_columns(columns: list[str], where: str) -> None:
    if columns == ["text"]:
        return
    if list(columns[:2]) != list(PAIR_COLUMNS) or any(not c.startswith("negative") for c in columns[2:]):
        raise UserError(
            f"{where}.columns: got {columns}; training columns are anchor, positive and optional negative, "
            "negative_2, ... (or a single text column for label-free distillation)"
        )


def _from_table(dataset: Dataset, source: SourceConfig, where: str) -> Dataset:
    if source.score_column is not None:
        if source.score_column not in dataset.column_names:
            raise UserError(
                f"{where}.score_column: {source.score_column!r} is not a column; available: {dataset.column_names}"
            )
        threshold = source.min_score if source.min_score is not None else float("-inf")
        dataset = dataset.filter(lambda row: row[source.score_column] >= threshold)
    mapping = source.columns or {name: name for name in dataset.column_names if name in (*PAIR_COLUMNS, "text")}
    for ours, theirs in mapping.items():
        if theirs not in dataset.column_names:
            raise UserError(
                f"{where}.columns.{ours}: column {theirs!r} is not in the dataset; available: {dataset.column_names}"
            )
    _check_columns(list(mapping), where)
    dataset = dataset.select_columns(list(mapping.values()))
    return dataset.rename_columns({theirs: ours for ours, theirs in mapping.items() if theirs != ours})


def _load_file(path: str, where: str) -> Dataset:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{where}.path: {path!r} does not exist. {beir.SHARED_DATA_HINT}")
    kind = FILE_FORMATS.get(file.suffix)
    if kind is None:
        raise UserError(f"{where}.path: {path!r} has an unknown format; valid: {', '.join(FILE_FORMATS)}")
    records = sum(1 for _ in beir.read_jsonl(file)) if file.suffix == ".jsonl" else file.stat().st_size
    if not records:  # a broken jsonl line is named above, with its line number
        raise UserError(f"{where}.path: {path!r} is empty; an empty dataset cannot train")
    options = {"delimiter": "\t"} if file.suffix == ".tsv" else {}
    try:
        return load_dataset(kind, data_files=str(file), split="train", **options)
    except (DatasetGenerationError, ValueError, OSError) as error:
        raise UserError(f"{where}.path: cannot read {path!r} as {kind}: {error.__cause__ or error}") from None


def _load_hub(source: SourceConfig, where: str) -> Dataset:
    try:
        return load_dataset(source.hub, source.subset, split=source.split)
    except Exception as error:  # datasets raises many types (connection, missing split, ...)
        raise UserError(f"{where}.hub: cannot load {source.hub!r} split {source.split!r}: {error}") from None


def load_source(source: SourceConfig, where: str = "data.train[0]") -> Dataset:
    """One source as a Dataset with our column names, filtered and capped."""
    if source.beir:
        pairs = beir.relevant_pairs(beir.load_split(source.beir, source.split), int(source.min_score or 1))
        dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    elif source.texts:
        texts = beir.load_corpus(source.texts).values()
        dataset = Dataset.from_dict({"text": [t for t in texts if t.strip()]})
    elif source.hub:
        dataset = _from_table(_load_hub(source, where), source, where)
    else:
        dataset = _from_table(_load_file(source.path, where), source, where)
    if source.max_samples is not None and len(dataset) > source.max_samples:
        dataset = dataset.shuffle(seed=0).select(range(source.max_samples))
    if len(dataset) == 0:
        raise UserError(f"{where}: source {source.label!r} gives an empty dataset")
    return dataset


def load_sources(sources: list[SourceConfig], section: str = "data.train") -> Dataset | DatasetDict:
    """One source: a Dataset; several: a DatasetDict keyed by source name (sampled batch by batch)."""
    datasets = {}
    for index, source in enumerate(sources):
        name = source.name or f"{Path(str(source.label)).name or 'source'}_{index}"
        datasets[name] = load_source(source, f"{section}[{index}]")
    return next(iter(datasets.values())) if len(datasets) == 1 else DatasetDict(datasets)


def text_columns(dataset: Dataset) -> list[str]:
    return [name for name in dataset.column_names if name != "label"]
