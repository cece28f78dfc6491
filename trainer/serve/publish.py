"""Publish a checkpoint to the Hugging Face Hub with a model card that shows the grid.

``publish`` checks the checkpoint, stages exactly the files to upload (model, heads, manifest, grid.json,
Pareto plot, README.md model card) and uploads them in one commit with ``HfApi.upload_folder``; LoRA adapters
(``trainer.lora``) are merged into plain weights that load without peft. The token comes from the usual places
(``HF_TOKEN``, ``hf auth login``) through huggingface_hub and is never printed or written. ``dry_run`` writes
the staged files to a folder and uploads nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from safetensors import safe_open
from sentence_transformers import SentenceTransformer

from trainer.binary.heads import HEADS_FOLDER, BinaryHeads
from trainer.errors import UserError
from trainer.grid import Cell
from trainer.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_checkpoint, merge_lora
from trainer.manifest import MANIFEST_NAME, read_manifest
from trainer.serve.card import render_card
from trainer.serve.checkpoint import check_model_folder

SKIPPED = ("checkpoint-", "training_args.bin", "runs", "eval", "README.md")
EVAL_FILES = ("grid.json", "pareto.png")


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest, once the folder is shown to be a complete, consistent checkpoint."""
    if not folder.is_dir():
        raise UserError(f"checkpoint: {str(folder)!r} is not a folder")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"checkpoint: {folder} has no {MANIFEST_NAME}; publish a folder written by `trainer train`")
    adapters = is_adapter_checkpoint(folder)
    weights = folder / (ADAPTER_WEIGHTS if adapters else "model.safetensors")
    if not weights.is_file():
        raise UserError(f"checkpoint: {folder} has no {weights.name}")
    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises several types for truncated or foreign files
        raise UserError(f"checkpoint: {weights} is not a readable safetensors file ({error})") from None
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
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


def _load_grid(grid_dir: Path | None, manifest: dict[str, Any], cells: list[str] | None) -> dict[str, Any] | None:
    if grid_dir is None:
        return None
    path = grid_dir / "grid.json"
    if not path.is_file():
        raise UserError(f"--grid: {grid_dir} has no grid.json; run `python -m eval grid --model <checkpoint>`")
    grid = json.loads(path.read_text())
    for entry in grid["cells"]:
        try:
            Cell.parse(entry["cell"]).check_fits(manifest["num_layers"], manifest["embedding_dim"])
        except ValueError as error:
            raise UserError(f"--grid: grid.json does not belong to this checkpoint: {error}") from None
    if cells:
        wanted = {str(Cell.parse(c, key="--cells")) for c in cells}
        missing = wanted - {entry["cell"] for entry in grid["cells"]}
        if missing:
            raise UserError(f"--cells: {sorted(missing)} were not evaluated in {path}")
        grid = {**grid, "cells": [entry for entry in grid["cells"] if entry["cell"] in wanted]}
    return grid


def stage(checkpoint: Path, target: Path, repo_id: str, grid_dir: Path | None, cells: list[str] | None) -> list[str]:
    """Write every file to upload into ``target``; returns their relative paths."""
    manifest = check_checkpoint(checkpoint)
    grid = _load_grid(grid_dir, manifest, cells)
    skipped = SKIPPED
    if is_adapter_checkpoint(checkpoint):  # LoRA: publish plain weights that load without peft
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
    has_plot = False
    if grid is not None:
        (target / "grid.json").write_text(json.dumps(grid, indent=2) + "\n")
        if (grid_dir / "pareto.png").is_file():
            shutil.copy2(grid_dir / "pareto.png", target / "pareto.png")
            has_plot = True
        manifest = {**manifest, "evaluation": {"grid": "grid.json", "tasks": grid["tasks"]}}
        (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    (target / "README.md").write_text(render_card(repo_id, manifest, grid, has_plot))
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
    checkpoint = Path(checkpoint)
    if grid_dir is None and (checkpoint / "eval" / "grid.json").is_file():
        grid_dir = checkpoint / "eval"
    grid_dir = Path(grid_dir) if grid_dir else None
    if dry_run is not None:
        target = Path(dry_run)
        if target.exists() and any(target.iterdir()):
            raise UserError(f"--dry-run: {str(target)!r} is not empty; give a new folder")
        target.mkdir(parents=True, exist_ok=True)
        return stage(checkpoint, target, repo_id, grid_dir, cells)
    with tempfile.TemporaryDirectory() as staging:
        files = stage(checkpoint, Path(staging), repo_id, grid_dir, cells)
        api = HfApi()
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            repo_type="model",
            commit_message=f"Upload elastic embedding model ({len(files)} files)",
        )
    return files
