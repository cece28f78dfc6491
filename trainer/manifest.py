"""``elastic_manifest.json``: what a multi-granularity checkpoint serves and how it was made.

With the training loss it also records the loss's class, ``get_config_dict()`` and ``citation`` (as
sentence-transformers' losses carry them), which the model card shows (``trainer.serve.card``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer

from trainer.cell_vectors import embedding_dim, num_layers
from trainer.errors import UserError
from trainer.grid import Grid
from trainer.train.recipe import Recipe

MANIFEST_NAME = "elastic_manifest.json"
FORMAT_VERSION = 1
PACKAGES = ("elastic-embeddings", "torch", "transformers", "sentence-transformers", "mteb", "datasets", "accelerate")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(recipe: Recipe, grid: Grid, model: SentenceTransformer, loss: Any = None) -> dict[str, Any]:
    bits = sorted(set(grid.bits) | set(getattr(recipe.binary, "bits", None) or []))
    manifest = {
        "format_version": FORMAT_VERSION,
        "base_model": recipe.model.name,
        "num_layers": num_layers(model),
        "embedding_dim": embedding_dim(model),
        "loss": recipe.loss.type,
        "cells": [cell.name2d for cell in grid.cells],
        "bits": bits,
        "recipe": dataclasses.asdict(recipe),
        "packages": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if loss is not None:
        manifest["loss_class"] = type(loss).__name__
        manifest["loss_config"] = loss.get_config_dict()
        manifest["citation"] = loss.citation
    return manifest


def write_manifest(
    recipe: Recipe, grid: Grid, model: SentenceTransformer, folder: Path | None = None, loss: Any = None
) -> Path:
    path = Path(folder or recipe.output_dir) / MANIFEST_NAME
    path.write_text(json.dumps(build_manifest(recipe, grid, model, loss), indent=2, default=str) + "\n")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"checkpoint: {path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"checkpoint: {path} is not a manifest (expected a JSON object)")
    return manifest
