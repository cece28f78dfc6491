"""Read a BEIR-format folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) and write capped copies.

A broken file is a ``UserError`` naming the file and the 1-based line: text that is not UTF-8, a line that
is not a JSON object, a record without ``_id`` (or a query without ``text``), a qrels row without three
columns or with a score that is not a number.
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Iterator
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
    title, text = str(doc.get("title") or "").strip(), str(doc.get("text") or "").strip()
    return f"{title} {text}".strip() if title else text


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line of a UTF-8 file."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line)") from None
            if line.strip():
                yield number, line


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """The JSON objects of a jsonl file, each with the keys ``required``."""
    for number, line in read_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise UserError(f"{path}:{number}: the record has no {', '.join(missing)}; BEIR records need {required}")
        yield record


def check_folder(folder: str | Path, split: str | None = None) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        siblings = [p.name for p in folder.parent.iterdir() if p.is_dir()] if folder.parent.is_dir() else []
        close = difflib.get_close_matches(folder.name, siblings, n=1)
        hint = f"did you mean {str(folder.parent / close[0])!r}? " if close else ""
        raise UserError(f"BEIR folder {str(folder)!r} does not exist; {hint}{SHARED_DATA_HINT}")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise UserError(f"BEIR folder {str(folder)!r} has no {name}")
    if split is not None and not (folder / "qrels" / f"{split}.tsv").is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise UserError(f"BEIR folder {str(folder)!r} has no split {split!r}; available splits: {available}")
    return folder


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    lines = read_lines(path)
    _, header = next(lines, (1, ""))
    if [h.strip() for h in header.split("\t")[:2]] != ["query-id", "corpus-id"]:
        raise UserError(f"{path}:1: expected a header 'query-id<TAB>corpus-id<TAB>score'")
    for number, line in lines:
        row = line.rstrip("\r\n").split("\t")
        if len(row) < 3:
            raise UserError(f"{path}:{number}: expected query-id<TAB>corpus-id<TAB>score, got {line.strip()!r}")
        try:
            score = int(float(row[2]))
        except (ValueError, OverflowError):
            raise UserError(f"{path}:{number}: score {row[2]!r} is not a number") from None
        qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def load_corpus(folder: str | Path) -> dict[str, str]:
    path = check_folder(folder) / "corpus.jsonl"
    return {str(d["_id"]): document_text(d) for d in read_jsonl(path, required=("_id",))}


def load_queries(folder: str | Path) -> dict[str, str]:
    path = check_folder(folder) / "queries.jsonl"
    return {str(q["_id"]): str(q["text"]) for q in read_jsonl(path, required=("_id", "text"))}


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
