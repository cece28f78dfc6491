"""Resolve task specs to mteb retrieval tasks and read the texts mteb will hand the model.

A spec is ``NAME[:SPLIT]``. ``NAME`` is a local BEIR folder (any spec naming an existing directory or
containing a path separator), an mteb mock task (``Mock...``, offline) or any mteb retrieval task.
BEIR folders become an ``AbsTaskRetrieval`` subclass so mteb's own evaluator and metrics apply to them.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mteb
from datasets import Dataset
from mteb.abstasks.abstask import AbsTask
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata

from trainer.beir import load_split
from trainer.errors import UserError

DEFAULT_SPLIT = "test"


@dataclass(frozen=True)
class TaskTexts:
    """The ids and the exact strings mteb gives the encoder, for one task split (documents: "title text")."""

    query_ids: list[str]
    queries: list[str]
    doc_ids: list[str]
    docs: list[str]


def _metadata(name: str, folder: Path, split: str, revision: str) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description=f"Local BEIR-format folder {folder} (split {split}).",
        reference=None,
        dataset={"path": str(folder), "revision": revision},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
    )


def _folder_revision(folder: Path, split: str) -> str:
    """A short content hash (sha256 of corpus, queries and the split's qrels) so changed data re-scores."""
    digest = hashlib.sha256()
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class BeirFolderTask(AbsTaskRetrieval):
    """A local BEIR folder as an mteb retrieval task (one split, documents already joined as "title text").

    mteb keeps ``metadata`` on the class (``unload_data`` drops instance copies), so ``beir_task`` makes one
    subclass per folder and split.
    """

    folder: Path
    split_name: str

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        data = load_split(self.folder, self.split_name)
        self.dataset = {
            "default": {
                self.split_name: {
                    "corpus": Dataset.from_dict(
                        {"id": list(data.corpus), "title": [""] * len(data.corpus), "text": list(data.corpus.values())}
                    ),
                    "queries": Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())}),
                    "relevant_docs": {qid: dict(docs) for qid, docs in data.qrels.items() if qid in data.queries},
                    "top_ranked": None,
                }
            }
        }
        self.data_loaded = True


def beir_task(folder: str | Path, split: str = DEFAULT_SPLIT) -> BeirFolderTask:
    """The mteb task of ``folder``'s ``split``; UserError for a missing folder or split, or an empty corpus."""
    folder = Path(folder)
    load_split(folder, split)  # validates now, before any result is written
    metadata = _metadata(folder.resolve().name, folder.resolve(), split, _folder_revision(folder, split))
    attributes = {"metadata": metadata, "folder": folder, "split_name": split}
    return type(f"BeirFolderTask_{metadata.name}", (BeirFolderTask,), attributes)()


def _is_folder_spec(name: str) -> bool:
    return "/" in name or name.startswith(".") or Path(name).is_dir()


def _mock_task(name: str) -> AbsTask:
    from mteb.mocks import mock_tasks

    task_class = getattr(mock_tasks, name, None)
    if task_class is None:
        names = [n for n in dir(mock_tasks) if n.startswith("Mock") and "Retrieval" in n]
        close = difflib.get_close_matches(name, names, n=3)
        raise UserError(f"tasks: unknown mock task {name!r}; did you mean {close or names[:3]}?")
    return task_class()


def _mteb_task(name: str) -> AbsTask:
    try:
        task = mteb.get_task(name)
    except KeyError:
        names = [t.metadata.name for t in mteb.get_tasks(task_types=["Retrieval"])]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `mteb.get_tasks(task_types=['Retrieval'])`"
        raise UserError(
            f"tasks: unknown task {name!r}; {hint} (or give a local BEIR folder such as ../shared/data/cranfield:test)"
        ) from None
    return task


def resolve_task(spec: str) -> tuple[AbsTaskRetrieval, str]:
    """The task and split named by ``NAME[:SPLIT]``; checks that the split exists before anything runs."""
    name, _, split = str(spec).partition(":")
    if _is_folder_spec(name):
        task = beir_task(name, split or DEFAULT_SPLIT)
        return task, task.split_name
    task = _mock_task(name) if name.startswith("Mock") else _mteb_task(name)
    if not isinstance(task, AbsTaskRetrieval):
        raise UserError(f"tasks: {name!r} is a {task.metadata.type} task; only retrieval tasks are supported")
    splits = list(task.metadata.eval_splits)
    split = split or (DEFAULT_SPLIT if DEFAULT_SPLIT in splits else splits[0])
    if split not in splits:
        raise UserError(f"tasks: {name} has no split {split!r}; available splits: {splits}")
    task.filter_eval_splits([split])
    return task, split


def document_texts(corpus: Dataset) -> list[str]:
    """A document as mteb's retrieval dataloader hands it to the model: ``"title text"`` stripped, or the text."""
    titles = corpus["title"] if "title" in corpus.column_names else [None] * len(corpus)
    return [
        f"{title} {text}".strip() if title else text.strip() for title, text in zip(titles, corpus["text"], strict=True)
    ]


def query_texts(queries: Dataset, task_name: str) -> list[str]:
    """A query as mteb hands it to the model: its text, followed by its instruction when the task has one."""
    texts = queries["text"]
    if texts and isinstance(texts[0], (dict, list)):
        raise UserError(f"tasks: {task_name} has conversational queries; only text queries are supported")
    if "instruction" not in queries.column_names:
        return list(texts)
    return [
        text if instruction is None else f"{text} {instruction}"
        for text, instruction in zip(texts, queries["instruction"], strict=True)
    ]


def task_texts(task: AbsTaskRetrieval, split: str) -> TaskTexts:
    """Load the task and return its queries and documents exactly as mteb's dataloaders present them
    (``document_texts``, ``query_texts``; tests/test_eval_helpers.py checks them against mteb's own).

    Raises UserError for an empty corpus or no judged query.
    """
    if not task.data_loaded:
        task.load_data()
    task.convert_v1_dataset_format_to_v2(num_proc=None)
    subsets = list(task.dataset)
    if len(subsets) != 1:
        raise UserError(f"tasks: {task.metadata.name} has subsets {subsets}; only single-subset tasks are supported")
    data = task.dataset[subsets[0]][split]
    corpus, queries = data["corpus"], data["queries"]
    if len(corpus) == 0:
        raise UserError(f"tasks: {task.metadata.name} split {split!r} has an empty corpus")
    if len(queries) == 0:
        raise UserError(f"tasks: {task.metadata.name} split {split!r} has no queries")
    return TaskTexts(
        query_ids=[str(i) for i in queries["id"]],
        queries=query_texts(queries, task.metadata.name),
        doc_ids=[str(i) for i in corpus["id"]],
        docs=document_texts(corpus),
    )
