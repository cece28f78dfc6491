"""Read a BEIR-format folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

SHARED_DATA_HINT = (
    "The real retrieval data lives in ../shared/data beside the project checkout (BEIR format). "
    "Without it, use a hub recipe instead, e.g. configs/starbucks-bert-msmarco.yaml."
)


@dataclass(frozen=True)
class BeirSplit:
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]  # query id -> text (only queries judged in this split)
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> relevance


def document_text(doc: dict) -> str:
    """BEIR convention: the title, a space, then the text (title omitted when empty)."""
    title, text = (doc.get("title") or "").strip(), (doc.get("text") or "").strip()
    return f"{title} {text}".strip() if title else text


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_folder(folder: str | Path, split: str | None = None) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"BEIR folder {str(folder)!r} does not exist. {SHARED_DATA_HINT}")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise UserError(f"BEIR folder {str(folder)!r} has no {name}")
    if split is not None and not (folder / "qrels" / f"{split}.tsv").is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise UserError(f"BEIR folder {str(folder)!r} has no split {split!r}; available splits: {available}")
    return folder


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["query-id", "corpus-id"]:
            raise UserError(f"{path}: expected a header 'query-id<TAB>corpus-id<TAB>score'")
        for row in reader:
            if len(row) >= 3:
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


def load_corpus(folder: str | Path) -> dict[str, str]:
    return {str(d["_id"]): document_text(d) for d in _read_jsonl(check_folder(folder) / "corpus.jsonl")}


def load_queries(folder: str | Path) -> dict[str, str]:
    return {str(q["_id"]): q["text"] for q in _read_jsonl(check_folder(folder) / "queries.jsonl")}


def load_split(folder: str | Path, split: str) -> BeirSplit:
    folder = check_folder(folder, split)
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    queries = {qid: text for qid, text in load_queries(folder).items() if qid in qrels}
    corpus = load_corpus(folder)
    if not corpus:
        raise UserError(f"BEIR folder {str(folder)!r}: corpus.jsonl is empty")
    if not queries:
        raise UserError(f"BEIR folder {str(folder)!r}: no query of split {split!r} is in queries.jsonl")
    return BeirSplit(corpus, queries, qrels)


def relevant_pairs(split: BeirSplit, min_score: int = 1) -> list[tuple[str, str]]:
    """(query text, relevant document text) for every judgment with score >= min_score."""
    return [
        (split.queries[qid], split.corpus[did])
        for qid, docs in split.qrels.items()
        if qid in split.queries
        for did, score in docs.items()
        if score >= min_score and did in split.corpus
    ]
