"""Publish a checkpoint to the Hugging Face Hub with a model card that shows the grid.

``publish`` checks the checkpoint, stages exactly the files to upload (model, heads, manifest with the
servable cells, grid.json, Pareto plots, README.md model card) and uploads them in one commit with
``HfApi.upload_folder``; LoRA adapters (``trainer.lora``) are merged into plain weights that load without
peft. The token comes from the usual places (``HF_TOKEN``, ``hf auth login``) through huggingface_hub and is
never printed or written. ``dry_run`` writes the staged files to a folder and uploads nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from sentence_transformers import SentenceTransformer

from trainer.binary.heads import HEADS_FOLDER, BinaryHeads
from trainer.cell_vectors import code_heads
from trainer.errors import UserError
from trainer.grid import Cell, parse_cells
from trainer.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_checkpoint, merge_lora
from trainer.manifest import MANIFEST_NAME, read_manifest
from trainer.outputs import check_writable_folder
from trainer.serve.card import render_card
from trainer.serve.checkpoint import check_model_folder

logger = logging.getLogger(__name__)

SKIPPED = ("checkpoint-", "training_args.bin", "runs", "eval", "README.md")
PLOT_FILES = ("pareto.png", "pareto-latency.png")


def check_repo_id(repo_id: str) -> str:
    """``namespace/name`` by the Hub's own naming rules (``huggingface_hub.utils.validate_repo_id``)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"--repo-id: {repo_id!r} is not a valid Hub repository id: {error}") from None
    if repo_id.count("/") != 1:
        raise UserError(f"--repo-id: {repo_id!r} has no namespace; give namespace/name, e.g. my-org/minilm-elastic")
    return repo_id


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest, once the folder is shown to be a complete, consistent checkpoint."""
    check_model_folder(folder, key="checkpoint")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"checkpoint: {folder} has no {MANIFEST_NAME}; publish a folder written by `trainer train`")
    adapters = is_adapter_checkpoint(folder)
    weights = folder / (ADAPTER_WEIGHTS if adapters else "model.safetensors")
    if not weights.is_file():
        raise UserError(f"checkpoint: {folder} has no {weights.name}")
    config = _read_json(folder / "config.json", "checkpoint") if (folder / "config.json").is_file() else {}
    if not adapters and config.get("num_hidden_layers") != manifest.get("num_layers"):
        raise UserError(
            f"checkpoint: manifest says {manifest.get('num_layers')} layers, config.json says "
            f"{config.get('num_hidden_layers')}"
        )
    code_bits = sorted(b for b in manifest.get("bits", []) if not Cell(1, 1, b).is_float)
    heads = BinaryHeads.load(folder) if code_bits else None
    if code_bits and heads is None:
        raise UserError(f"checkpoint: manifest lists bit depths {code_bits} but {folder}/{HEADS_FOLDER} is missing")
    if heads is not None and sorted(heads.bits) != code_bits:
        raise UserError(f"checkpoint: manifest bits {code_bits} differ from the saved heads' {list(heads.bits)}")
    return manifest


def _read_json(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{key}: {path} is not valid JSON ({error})") from None


def _load_grid(grid_dir: Path | None, manifest: dict[str, Any], cells: list[str] | None) -> dict[str, Any] | None:
    if grid_dir is None:
        return None
    path = grid_dir / "grid.json"
    if not path.is_file():
        raise UserError(f"--grid: {grid_dir} has no grid.json; run `python -m eval grid --model <checkpoint>`")
    grid = _read_json(path, "--grid")
    if not isinstance(grid, dict) or not isinstance(grid.get("cells"), list) or "tasks" not in grid:
        raise UserError(f"--grid: {path} is not a grid.json written by `python -m eval grid`")
    for entry in grid["cells"]:
        try:
            Cell.parse(entry["cell"]).check_fits(manifest["num_layers"], manifest["embedding_dim"])
        except (KeyError, TypeError, UserError) as error:
            raise UserError(f"--grid: {path} does not belong to this checkpoint: {error}") from None
    if cells:
        wanted = {str(cell) for cell in parse_cells(cells, key="--cells")}
        missing = wanted - {entry["cell"] for entry in grid["cells"]}
        if missing:
            raise UserError(f"--cells: {sorted(missing)} were not evaluated in {path}")
        grid = {**grid, "cells": [entry for entry in grid["cells"] if entry["cell"] in wanted]}
    return grid


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def servable_cells(grid: dict[str, Any], heads: BinaryHeads | None) -> list[dict[str, Any]]:
    """The evaluated cells this checkpoint serves as they were scored, with nDCG@10 per task, bytes per vector,
    speed (means over tasks) and Pareto flags: every float cell, and each binary cell the checkpoint's codes
    serve, unless the grid scored sign codes (``--codes sign``) where the checkpoint serves trained heads."""
    tasks = [t["name"] for t in grid["tasks"]]
    cells = []
    for entry in grid["cells"]:
        cell = Cell.parse(entry["cell"])
        if not cell.is_float:
            if grid.get("codes") == "sign" and heads is not None:
                continue
            try:
                code_heads(heads, cell)
            except UserError:
                continue
        costs = [entry["cost"][t] for t in tasks if t in entry.get("cost", {})]
        measured = len(costs) == len(tasks)
        cells.append(
            {
                "cell": str(cell),
                "bits": cell.bits,
                "bytes_per_vector": cell.bytes_per_vector,
                "ndcg_at_10": {t: entry["scores"][t]["ndcg_at_10"] for t in tasks},
                "ms_per_query": _mean([c["ms_per_query"] for c in costs]) if measured else None,
                "queries_per_s": _mean([c["queries_per_s"] for c in costs]) if measured else None,
                "pareto": entry.get("pareto", {}),
            }
        )
    return cells


def stage(checkpoint: Path, target: Path, repo_id: str, grid_dir: Path | None, cells: list[str] | None) -> list[str]:
    """Write every file to upload into ``target``; returns their relative paths."""
    manifest = check_checkpoint(checkpoint)
    grid = _load_grid(grid_dir, manifest, cells)
    logger.info("publish: staging %s for %s in %s", checkpoint, repo_id, target)
    skipped = SKIPPED
    if is_adapter_checkpoint(checkpoint):  # LoRA: publish plain weights that load without peft
        logger.info("publish: merging the LoRA adapters into plain weights")
        model = SentenceTransformer(str(check_model_folder(checkpoint, "checkpoint")), device="cpu")
        merge_lora(model)
        model.save(str(target))
        skipped += (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *(p.name for p in target.iterdir()))
    for item in checkpoint.iterdir():
        if item.name.startswith(skipped):
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)
    plots = []
    if grid is not None:
        (target / "grid.json").write_text(json.dumps(grid, indent=2) + "\n")
        plots = [name for name in PLOT_FILES if (grid_dir / name).is_file()]
        for name in plots:
            shutil.copy2(grid_dir / name, target / name)
        manifest = {
            **manifest,
            "evaluation": {"grid": "grid.json", "tasks": grid["tasks"], "machine": grid.get("machine")},
            "servable_cells": servable_cells(grid, BinaryHeads.load(checkpoint)),
        }
        (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    (target / "README.md").write_text(render_card(repo_id, manifest, grid, plots))
    return sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())


def publish(
    checkpoint: str | Path,
    repo_id: str,
    private: bool = False,
    cells: list[str] | None = None,
    grid_dir: str | Path | None = None,
    dry_run: str | Path | None = None,
) -> list[str]:
    """Stage and upload (or, with ``dry_run``, only stage) a checkpoint; returns the file list."""
    check_repo_id(repo_id)
    checkpoint = Path(checkpoint)
    if grid_dir is None and (checkpoint / "eval" / "grid.json").is_file():
        grid_dir = checkpoint / "eval"
    grid_dir = Path(grid_dir) if grid_dir else None
    if dry_run is not None:
        target = check_writable_folder(dry_run, key="--dry-run")
        if target.exists() and any(target.iterdir()):
            raise UserError(f"--dry-run: {str(target)!r} is not empty; give a new folder")
        manifest = check_checkpoint(checkpoint)
        _load_grid(grid_dir, manifest, cells)
        target.mkdir(parents=True, exist_ok=True)
        return stage(checkpoint, target, repo_id, grid_dir, cells)
    with tempfile.TemporaryDirectory() as staging:
        files = stage(checkpoint, Path(staging), repo_id, grid_dir, cells)
        size = sum(p.stat().st_size for p in Path(staging).rglob("*") if p.is_file())
        logger.info("publish: uploading %d files (%.1f MB) to %s", len(files), size / 1e6, repo_id)
        api = HfApi()
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            repo_type="model",
            commit_message=f"Upload elastic embedding model ({len(files)} files)",
        )
    return files
