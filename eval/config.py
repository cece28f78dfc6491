"""Merge a YAML evaluation config with command-line flags (flags win) into a ``GridRequest``.

YAML keys are the flag names with underscores: model, tasks, cells, layers, dims, bits, rescore, output,
batch_size, overwrite, max_seq_length, store_dtype, devices. Without cells or layers/dims the grid is every
layer x the dims ``32, 64, 128, ... < D`` plus ``D``; without bits it is float and 1-bit codes (B32, B1).
Cells listed with their bits (``L6-D384-B1 L2-D64``) are scored exactly as listed. Config values get the
types of ``KEY_TYPES`` (``trainer.settings``); everything is checked before the model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.runner import CODE_SOURCES, GridRequest
from trainer.errors import UserError
from trainer.grid import FLOAT_BITS, Grid
from trainer.outputs import check_writable_folder
from trainer.settings import did_you_mean, read_yaml, typed_value
from trainer.store import DTYPES

KEY_TYPES = {
    "model": str | None,
    "tasks": list[str] | None,
    "cells": list[str] | None,
    "layers": list[int] | None,
    "dims": list[int] | None,
    "bits": list[int] | None,
    "rescore": int | None,
    "codes": str | None,
    "output": str | None,
    "batch_size": int | None,
    "overwrite": bool | None,
    "max_seq_length": int | None,
    "store_dtype": str | None,
    "devices": list[str] | None,
}
KEYS = tuple(KEY_TYPES)
DEFAULT_BITS = (FLOAT_BITS, 1)


def load_config(path: str | Path) -> dict[str, Any]:
    """The config file's settings, each typed by ``KEY_TYPES``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config: {str(path)!r} does not exist")
    data = read_yaml(path, key="--config") or {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must be a mapping of keys {list(KEYS)}")
    for key in data:
        if key not in KEY_TYPES:
            raise UserError(f"{path}: {key}: unknown key{did_you_mean(str(key), list(KEYS))}; valid keys: {list(KEYS)}")
    return {key: typed_value(value, KEY_TYPES[key], f"{path}: {key}") for key, value in data.items()}


def merge(config: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Config values, overridden by every flag that was given (not None)."""
    return {**config, **{k: v for k, v in flags.items() if v is not None}}


def default_dims(embedding_dim: int) -> list[int]:
    """Powers of two from 32 below the model's width, then the full width."""
    dims, dim = [], 32
    while dim < embedding_dim:
        dims.append(dim)
        dim *= 2
    return [*dims, embedding_dim]


def model_slug(model: str) -> str:
    path = Path(model)
    return path.resolve().name if path.is_dir() else model.replace("/", "__")


def _codes(value: Any) -> str:
    value = value or "trained"
    if value not in CODE_SOURCES:
        raise UserError(f"codes: {value!r} is not valid; use one of {list(CODE_SOURCES)}")
    return value


def _store_dtype(value: Any) -> str:
    value = value or "float32"
    if value not in DTYPES:
        raise UserError(f"store_dtype: {value!r} is not valid; use one of {list(DTYPES)}")
    return value


def _devices(value: Any) -> tuple[str, ...]:
    """Torch device names, e.g. ``[cuda:0, cuda:1]`` or ``[cpu, cpu]`` (two CPU worker processes)."""
    import torch

    devices = [value] if isinstance(value, str) else list(value or [])
    for device in devices:
        try:
            parsed = torch.device(str(device))
        except RuntimeError:
            raise UserError(f"devices: {device!r} is not a torch device; use e.g. cuda:0, cuda:1 or cpu") from None
        if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
            raise UserError(f"devices: {device!r} is not available; this machine has {torch.cuda.device_count()} GPUs")
    return tuple(str(device) for device in devices)


def build_request(settings: dict[str, Any], num_layers: int, embedding_dim: int) -> GridRequest:
    """The checked request of merged settings; ``num_layers`` / ``embedding_dim`` fill the default grid and
    bound its cells. The output folder must be writable."""
    for key in ("model", "tasks"):
        if not settings.get(key):
            raise UserError(f"{key}: missing; give --{key} or '{key}:' in the config")
    tasks = settings["tasks"]
    tasks = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
    cells, layers, dims = settings.get("cells"), settings.get("layers"), settings.get("dims")
    if cells is None:
        layers = layers if layers is not None else list(range(1, num_layers + 1))
        dims = dims if dims is not None else default_dims(embedding_dim)
    grid = Grid.from_spec(cells=cells, layers=layers, dims=dims, bits=settings.get("bits"), default_bits=DEFAULT_BITS)
    grid.check_fits(num_layers, embedding_dim)
    rescore = int(settings.get("rescore") or 0)
    if rescore < 0:
        raise UserError(f"rescore: must be >= 0 (0 = off), got {rescore}")
    for key in ("batch_size", "max_seq_length"):
        if settings.get(key) is not None and settings[key] < 1:
            raise UserError(f"{key}: {settings[key]} is not valid; give an integer >= 1")
    output = Path(settings.get("output") or Path("results") / model_slug(str(settings["model"])))
    check_writable_folder(output, key="output")
    return GridRequest(
        model=str(settings["model"]),
        tasks=tasks,
        grid=grid,
        output=output,
        rescore=rescore,
        codes=_codes(settings.get("codes")),
        batch_size=int(settings.get("batch_size") or 64),
        overwrite=bool(settings.get("overwrite")),
        max_seq_length=int(settings["max_seq_length"]) if settings.get("max_seq_length") else None,
        store_dtype=_store_dtype(settings.get("store_dtype")),
        devices=_devices(settings.get("devices")),
    )
