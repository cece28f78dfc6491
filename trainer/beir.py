"""Read a BEIR-format folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) and write capped copies."""

from __future__ import annotations

import csv
import json
import random
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


def write_subset(
    split: BeirSplit, split_name: str, folder: str | Path, max_queries: int | None, max_docs: int | None, seed: int
) -> Path:
    """Write a capped copy of ``split`` as a BEIR folder: ``max_queries`` judged queries drawn with ``seed``,
    and every document judged for them plus random others up to ``max_docs`` (a judged document is never
    dropped, so each kept query keeps its relevant documents). Files are replaced only when they change."""
    generator = random.Random(seed)
    query_ids = list(split.queries)
    if max_queries is not None and len(query_ids) > max_queries:
        kept = set(generator.sample(query_ids, max_queries))
        query_ids = [qid for qid in query_ids if qid in kept]
    qrels = {qid: split.qrels[qid] for qid in query_ids}
    judged = {did for docs in qrels.values() for did in docs if did in split.corpus}
    others = [did for did in split.corpus if did not in judged]
    room = len(others) if max_docs is None else max(0, max_docs - len(judged))
    docs = judged | set(generator.sample(others, min(room, len(others))))
    files = {
        "corpus.jsonl": "".join(
            json.dumps({"_id": did, "title": "", "text": text}) + "\n"
            for did, text in split.corpus.items()
            if did in docs
        ),
        "queries.jsonl": "".join(json.dumps({"_id": qid, "text": split.queries[qid]}) + "\n" for qid in query_ids),
        f"qrels/{split_name}.tsv": "query-id\tcorpus-id\tscore\n"
        + "".join(f"{qid}\t{did}\t{score}\n" for qid in query_ids for did, score in qrels[qid].items() if did in docs),
    }
    folder = Path(folder)
    for name, content in files.items():
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_text(content, encoding="utf-8")
            partial.replace(path)
    return folder
