"""Score every cell of a grid on every task with mteb, encoding each text once, resuming finished cells.

Result files follow mteb's cache layout under ``<output>/results``, one mteb *experiment* per cell::

    <output>/results/<model>/<revision>/experiments/cell_L4-D128-B1/<Task>.json
    <output>/results/<model>/<revision>/experiments/cell_L4-D128-B1__rescore_4/<Task>.json  (--rescore 4)
    <output>/results/<model>/<revision>/experiments/cell_L4-D128-B1__codes_sign/<Task>.json   (--codes sign)

so ``mteb.ResultCache(<output>)`` loads them and a rerun skips every cell whose split is already scored.
Embeddings of the grid's layers are stored in ``<output>/embeddings/<Task>-<split>/{query,doc}``
(``eval.embeddings``, on disk, resumable); each cell streams the documents from there (``eval.scan``). What
each cell costs to serve on this machine is measured into ``<output>/costs.json`` (``eval.cost``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.cache import ResultCache
from mteb.models.abs_encoder import get_prompt_name
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from eval.cost import CostStore, cell_cost, experiment_key, measure
from eval.embeddings import load_or_encode
from eval.scoring import CellScorer, judged_queries, metric_workers, ranked
from eval.search import CellSearch, CorpusRows, LayerScans
from eval.tasks import TaskTexts, resolve_task, task_texts
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import code_heads, embedding_dim, num_layers
from trainer.errors import UserError
from trainer.grid import Cell, Grid
from trainer.serve.checkpoint import resolve_model

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")  # adapters: LoRA checkpoints
CODE_SOURCES = ("trained", "sign")


@dataclass(frozen=True)
class GridRequest:
    """What to evaluate; ``rescore`` M > 0 re-ranks the top k*M code hits of binary cells with the float query."""

    model: str
    tasks: list[str]
    grid: Grid
    output: Path
    rescore: int = 0
    codes: str = "trained"  # "sign": the parameter-free residual sign quantiser even when the model has heads
    batch_size: int = 64
    overwrite: bool = False
    max_seq_length: int | None = None  # tokens per text; part of the result identity when set
    store_dtype: str = "float32"  # float16 halves the stores' disk size; float32 scores exactly as in memory
    devices: tuple[str, ...] = ()  # encoding devices, one worker process each; () = every GPU when >1, else one


@dataclass
class GridResults:
    """``scores[task][cell]`` is the mteb score dict of the evaluated split (ndcg_at_10, mrr_at_10, ...);
    ``costs[task][cell]`` what the cell costs to serve on ``machine`` (``eval.cost.cell_cost``)."""

    model: str
    revision: str
    num_layers: int
    embedding_dim: int
    cells: list[Cell]
    tasks: dict[str, str]  # task name -> split
    rescore: int
    codes: str = "trained"
    scores: dict[str, dict[Cell, dict[str, Any]]] = field(default_factory=dict)
    scored_cells: int = 0
    costs: dict[str, dict[Cell, dict[str, float]]] = field(default_factory=dict)  # see eval.cost
    machine: str = ""
    checkpoint: str = ""  # the --model as given, for the export commands of ``eval pick``


def load_model(model: str) -> SentenceTransformer:
    """The model of a checkpoint folder or hub id, checked first (``trainer.serve.checkpoint``)."""
    return SentenceTransformer(str(resolve_model(model)), device="cpu" if not _has_cuda() else None)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def encoding_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """The devices asked for, else every GPU when there are several (one worker process each), else none."""
    import torch

    if devices:
        return devices
    count = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(count)) if count > 1 else ()


def model_identity(model: str) -> tuple[str, str]:
    """(name, revision): a hub id as is, or ``local/<dir name>``; revision = SHA-256 prefix of the weights."""
    folder = Path(model)
    name = f"local/{folder.resolve().name}" if folder.is_dir() else model
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 -- an unresolvable snapshot only loses the revision label
            return name, "no_revision_available"
    for weights in WEIGHT_FILES:
        if (folder / weights).is_file():
            digest = hashlib.sha256((folder / weights).read_bytes()).hexdigest()
            return name, digest[:12]
    return name, "no_revision_available"


def cell_meta(name: str, revision: str, cell: Cell, rescore: int, codes: str = "trained") -> ModelMeta:
    """The mteb model metadata of one cell; ``experiment_kwargs`` names the experiment folder."""
    kwargs: dict[str, Any] = {"cell": str(cell)}
    if rescore and not cell.is_float:
        kwargs["rescore"] = rescore
    if codes != "trained" and not cell.is_float:
        kwargs["codes"] = codes
    return ModelMeta.create_empty(
        overwrites=dict(
            name=name,
            revision=revision,
            embed_dim=cell.dim,
            framework=["Sentence Transformers", "PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE if cell.is_float else ScoringFunction.DOT_PRODUCT,
            experiment_kwargs=kwargs,
        )
    )


def task_prompt(model: SentenceTransformer, task: AbsTaskRetrieval, prompt_type: PromptType) -> str | None:
    """The prompt mteb's SentenceTransformer wrapper would use (task-name, task-type, then role keys)."""
    prompts = {k: v for k, v in (model.prompts or {}).items() if v}
    key = get_prompt_name(prompts or None, task.metadata, prompt_type)
    return prompts.get(key) if key else None


def _is_scored(cache: ResultCache, meta: ModelMeta, task: AbsTaskRetrieval, split: str) -> bool:
    """A result file holds this split, scored on the same dataset revision (local folders: a content hash)."""
    result = cache.load_task_result(task.metadata.name, meta)
    if result is None or not result.scores.get(split):
        return False
    return result.dataset_revision == task.metadata.dataset["revision"]


def _split_scores(cache: ResultCache, meta: ModelMeta, task: AbsTaskRetrieval, split: str) -> dict[str, Any]:
    result = cache.load_task_result(task.metadata.name, meta, raise_if_not_found=True)
    return dict(result.scores[split][0])


def grid_summary(request: GridRequest, cells: list[Cell], texts: dict[str, TaskTexts]) -> str:
    """What an evaluation will do: model, cells (float and code), tasks with their sizes, output folder."""
    codes = [c for c in cells if not c.is_float]
    lines = [
        f"eval grid: {request.model}",
        f"  cells: {len(cells)} ({len(cells) - len(codes)} float, {len(codes)} codes: {request.codes})",
        *(f"  task {name}: {len(t.query_ids):,} queries, {len(t.doc_ids):,} documents" for name, t in texts.items()),
        f"  output: {request.output}",
    ]
    return "\n".join(lines)


def run_grid(request: GridRequest, model: SentenceTransformer | None = None) -> GridResults:
    """Validate everything first (cells, codes, tasks, splits), then encode once per task and score each cell."""
    model = model if model is not None else load_model(request.model)
    depth, width = num_layers(model), embedding_dim(model)
    request.grid.check_fits(depth, width)
    trained = request.codes == "trained" and Path(request.model).is_dir()
    heads = BinaryHeads.load(request.model) if trained else None
    cells = request.grid.all_cells()
    for cell in cells:
        if not cell.is_float:
            code_heads(heads, cell)  # refuses untrained depths and dims before any work
    tasks = [resolve_task(spec) for spec in request.tasks]
    names = [task.metadata.name for task, _ in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"tasks: {request.tasks} name the same task twice ({names})")
    texts = {task.metadata.name: task_texts(task, split) for task, split in tasks}
    logger.info(grid_summary(request, cells, {f"{t.metadata.name} {s}": texts[t.metadata.name] for t, s in tasks}))

    name, revision = model_identity(request.model)
    if request.max_seq_length:
        model.max_seq_length = request.max_seq_length
        revision = f"{revision}-len{request.max_seq_length}"
    cache = ResultCache(request.output)
    costs = CostStore(request.output, f"{name}@{revision}", request.batch_size, request.overwrite)
    splits = {t.metadata.name: s for t, s in tasks}
    results = GridResults(name, revision, depth, width, cells, splits, request.rescore, request.codes)
    results.machine, results.checkpoint = costs.machine, request.model
    devices = encoding_devices(request.devices)
    for task, split in tasks:
        task_name = task.metadata.name
        metas = {cell: cell_meta(name, revision, cell, request.rescore, request.codes) for cell in cells}
        keys = {cell: experiment_key(metas[cell].experiment_kwargs) for cell in cells}
        missing = [c for c in cells if request.overwrite or not _is_scored(cache, metas[c], task, split)]
        unmeasured = costs.unmeasured(f"{task_name}-{split}", {keys[c]: c for c in cells})
        if missing or unmeasured:
            prompts = (task_prompt(model, task, PromptType.query), task_prompt(model, task, PromptType.document))
            embeddings = load_or_encode(
                model,
                f"{name}@{revision}",
                texts[task_name],
                sorted({c.layers for c in cells}),  # every layer of the grid: a resumed grid reuses the stores
                request.output / "embeddings" / f"{task_name}-{split}",
                prompts=prompts,
                batch_size=request.batch_size,
                dtype=request.store_dtype,
                devices=devices,
            )
            rows = CorpusRows.of(judged_queries(task, split)[0], embeddings)  # the corpus, indexed once per task
            scans = LayerScans(missing)  # a layer's float cells from one scan of it: score layer by layer
            with (
                tqdm(total=len(missing), desc=f"Scoring cells of {task_name}", unit="cell") as progress,
                CellScorer(task, cache, request.batch_size, metric_workers(), progress) as scorer,
            ):
                for cell in sorted(missing, key=lambda c: c.layers):
                    search = CellSearch(cell, embeddings, metas[cell], heads, request.rescore, scans, rows)
                    scorer.submit(ranked(search, task, split))
                    results.scored_cells += 1
            searches = {
                keys[c]: CellSearch(c, embeddings, metas[c], heads=heads, rescore=request.rescore, rows=rows)
                for c in unmeasured
            }
            measure(costs, f"{task_name}-{split}", model, texts[task_name], searches, embeddings, prompts)
        results.scores[task_name] = {c: _split_scores(cache, metas[c], task, split) for c in cells}
        results.costs[task_name] = {c: cell_cost(costs.task(f"{task_name}-{split}"), c, keys[c]) for c in cells}
    return results
