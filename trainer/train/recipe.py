"""YAML recipes: parsed, overridden from the command line and validated before any model or data loads.

A recipe has the sections ``model``, ``data``, ``loss``, ``training`` (every
``SentenceTransformerTrainingArguments`` field) and optionally ``binary`` (recurrent binarization heads)
and ``distill`` (teacher distillation). ``--key value`` overrides a training argument, ``--section.key
value`` any other field; values are read as YAML (``--learning_rate 1e-4``, ``--loss.cells "[L2-D64]"``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.errors import UserError
from trainer.grid import Cell, Grid

LOSS_TYPES = ("starbucks", "2dmse", "grid")
OUR_TRAINING_KEYS = ("overwrite_output_dir",)


def _close(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def build_section(cls: type, values: Any, key: str):
    """Instantiate dataclass ``cls`` from a mapping, naming unknown keys and missing ones."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{key}: expected a mapping of settings, got {values!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in valid:
            raise UserError(f"{key}.{name}: unknown key{_close(name, valid)}; valid keys: {', '.join(valid)}")
    try:
        return cls(**values)
    except TypeError as error:  # a missing required field
        raise UserError(f"{key}: {error}; valid keys: {', '.join(valid)}") from None


@dataclass
class ModelConfig:
    """The student: any sentence-transformers model by hub id or local path."""

    name: str
    revision: str | None = None
    max_seq_length: int | None = None
    trust_remote_code: bool = False


@dataclass
class SourceConfig:
    """One data source. Exactly one of ``beir`` (pairs from qrels), ``hub``, ``path`` or ``texts``.

    - ``beir``: a BEIR folder; (query, relevant document) pairs of ``split`` with score >= ``min_score``.
    - ``hub``: a hub dataset id (``subset``, ``split``); ``path``: a local jsonl/json/parquet/csv file.
      ``columns`` maps our columns (anchor, positive, negative, negative_2...; or text) to the source's.
      ``score_column`` with ``min_score`` keeps rows scoring at least that (e.g. STS-B pairs >= 4).
    - ``texts``: label-free, one ``text`` column: every document of a BEIR folder's corpus (queries are left
      out: they belong to the evaluation splits).
    """

    beir: str | None = None
    hub: str | None = None
    path: str | None = None
    texts: str | None = None
    subset: str | None = None
    split: str = "train"
    columns: dict[str, str] | None = None
    score_column: str | None = None
    min_score: float | None = None
    max_samples: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("beir", "hub", "path", "texts") if getattr(self, k)]
        if len(given) != 1:
            raise UserError(f"data source {self.label}: give exactly one of beir, hub, path, texts (got {given})")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"data source {self.label}: max_samples must be >= 1, got {self.max_samples}")

    @property
    def label(self) -> str:
        return self.name or str(self.beir or self.hub or self.path or self.texts)


@dataclass
class DataConfig:
    train: list[SourceConfig]
    eval: list[SourceConfig] | None = None


@dataclass
class LossConfig:
    """2D Matryoshka settings. ``cells`` (e.g. ``[L2-D32, L6-D384]``) or ``layers`` x ``dims``.

    ``grid`` without ``layers`` trains every layer of the model. ``contrastive_weight: 0`` turns the
    contrastive/KL term off (label-free distillation).
    """

    type: Literal["starbucks", "2dmse", "grid"] = "starbucks"
    cells: list[str] | None = None
    layers: list[int] | None = None
    dims: list[int] | None = None
    scale: float = 20.0
    symmetric: bool = False
    gather_across_devices: bool = True
    contrastive_weight: float = 1.0
    cell_weights: dict[str, float] = field(default_factory=dict)
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    n_layers_per_step: int = 1
    n_dims_per_step: int = 1
    seed: int = 42

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise UserError(f"loss.type: {self.type!r} is not a loss; valid: {', '.join(LOSS_TYPES)}")
        for name in ("scale", "kl_temperature"):
            if getattr(self, name) <= 0:
                raise UserError(f"loss.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("contrastive_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"loss.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("n_layers_per_step", "n_dims_per_step"):
            if getattr(self, name) < 1:
                raise UserError(f"loss.{name}: must be >= 1, got {getattr(self, name)}")

    def grid(self, num_layers: int, embedding_dim: int) -> Grid:
        """The cells to train, checked against the model's depth and width."""
        layers = self.layers
        if self.type == "grid" and layers is None and self.cells is None:
            layers = list(range(1, num_layers + 1))
        try:
            grid = Grid.from_spec(cells=self.cells, layers=layers, dims=self.dims)
            if self.type == "starbucks" and self.cells is not None:
                grid.check_nested()
            grid.check_fits(num_layers, embedding_dim)
            for name in self.cell_weights:
                if Cell.parse(name, key="loss.cell_weights") not in grid.cells:
                    raise UserError(f"loss.cell_weights: {name} is not one of the trained cells")
        except UserError as error:
            raise UserError(f"loss.{error}") from None
        return grid


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    training: dict[str, Any]
    binary: Any = None  # trainer.binary.heads.BinaryConfig
    distill: Any = None  # trainer.train.teacher.DistillConfig
    path: str = ""

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])


def _training_fields() -> set[str]:
    from sentence_transformers import SentenceTransformerTrainingArguments

    return {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments) if f.init}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--key value`` / ``--key=value`` pairs; plain keys go to ``training``, dotted ones anywhere."""
    tokens = list(overrides)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise UserError(f"command line: expected --key value, got {token!r}")
        key, _, value = token[2:].partition("=")
        if not _:
            if not tokens or tokens[0].startswith("--"):
                raise UserError(f"command line: --{key} needs a value")
            value = tokens.pop(0)
        path = key.split(".") if "." in key else ["training", key]
        target = raw
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UserError(f"command line: --{key}: {part} is not a section")
        target[path[-1]] = parse_value(value)
    return raw


def parse_value(text: str) -> Any:
    """A command-line value: a number (also ``1e-4``, which YAML 1.1 reads as a string), else YAML."""
    number = as_number(text)
    if number is not None:
        return number
    return yaml.safe_load(text) if text != "" else ""


def as_number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


def _read_model_json(name: str, filename: str, revision: str | None) -> dict | None:
    """A JSON file of a local model folder or hub repo; None when the repo has no such file."""
    local = Path(name)
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(name, filename, revision=revision)).read_text())
    except EntryNotFoundError as error:  # LocalEntryNotFoundError (offline, not cached) is a subclass
        if isinstance(error, LocalEntryNotFoundError) and filename == "config.json":
            raise _unreadable(name, error) from None
        return None
    except (ValueError, OSError) as error:  # bad repo id, repository not found, network
        raise _unreadable(name, error) from None


def _unreadable(name: str, error: Exception) -> UserError:
    return UserError(
        f"model.name: cannot read config.json of {name!r} ({type(error).__name__}); offline, run `make models` "
        "or give a local sentence-transformers folder"
    )


def model_shape(model: ModelConfig) -> tuple[int, int]:
    """(transformer layers, sentence-embedding dim) from the model's config files, without loading weights."""
    config = _read_model_json(model.name, "config.json", model.revision)
    if config is None or "num_hidden_layers" not in config:
        raise UserError(f"model.name: {model.name!r} has no config.json with num_hidden_layers")
    dim = config.get("hidden_size")
    for module in _read_model_json(model.name, "modules.json", model.revision) or []:
        if module.get("type", "").endswith("Dense"):
            dense = _read_model_json(model.name, f"{module['path']}/config.json", model.revision) or {}
            dim = dense.get("out_features", dim)
    return int(config["num_hidden_layers"]), int(dim)


def parse_recipe(raw: dict[str, Any], path: str = "") -> Recipe:
    """Build and validate a recipe from its mapping; reads model config files but loads no weights."""
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'recipe'}: expected a YAML mapping at the top level")
    sections = [f.name for f in dataclasses.fields(Recipe) if f.name != "path"]
    for name in raw:
        if name not in sections:
            raise UserError(f"{name}: unknown section{_close(name, sections)}; valid sections: {', '.join(sections)}")
    for name in ("model", "data", "training"):
        if name not in raw:
            raise UserError(f"{name}: missing section; a recipe needs model, data and training")
    model = build_section(ModelConfig, raw["model"], "model")
    data_raw = raw["data"] if isinstance(raw["data"], dict) else {}
    if not data_raw.get("train"):
        raise UserError("data.train: no training data; list at least one source (beir, hub, path or texts)")
    data = build_section(DataConfig, data_raw, "data")
    data.train = [build_section(SourceConfig, s, f"data.train[{i}]") for i, s in enumerate(data.train)]
    if data.eval:
        data.eval = [build_section(SourceConfig, s, f"data.eval[{i}]") for i, s in enumerate(data.eval)]
    loss = build_section(LossConfig, raw.get("loss"), "loss")
    training = _check_training(raw["training"])
    binary = distill = None
    if raw.get("binary") is not None:
        from trainer.binary.heads import BinaryConfig

        binary = build_section(BinaryConfig, raw["binary"], "binary")
    if raw.get("distill") is not None:
        from trainer.train.teacher import DistillConfig

        distill = build_section(DistillConfig, raw["distill"], "distill")
    if loss.contrastive_weight == 0 and distill is None and binary is None:
        raise UserError("loss.contrastive_weight: 0 leaves nothing to train; add a distill or binary section")
    label_free = [s.label for s in data.train if s.texts]
    if label_free and distill is None and (binary is None or binary.mode != "head-only"):
        raise UserError(f"data.train: {label_free} are label-free texts; they need a distill section to train on")
    recipe = Recipe(model, data, loss, training, binary, distill, path)
    num_layers, embedding_dim = model_shape(model)
    grid = loss.grid(num_layers, embedding_dim)
    if binary is not None:
        binary.check_dims([*grid.dims, embedding_dim])
    return recipe


def _check_training(training: Any) -> dict[str, Any]:
    if not isinstance(training, dict):
        raise UserError(f"training: expected a mapping of SentenceTransformerTrainingArguments, got {training!r}")
    valid = sorted(_training_fields() | set(OUR_TRAINING_KEYS))
    for name in training:
        if name not in valid:
            raise UserError(
                f"training.{name}: unknown key{_close(name, valid)}; valid keys are the fields of "
                "SentenceTransformerTrainingArguments plus overwrite_output_dir"
            )
    if not training.get("output_dir"):
        raise UserError("training.output_dir: missing; say where checkpoints go, e.g. runs/my-model")
    return {k: v if not isinstance(v, str) or as_number(v) is None else as_number(v) for k, v in training.items()}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe: {str(path)!r} does not exist; see configs/ for examples")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"recipe: {path} is not valid YAML: {error}") from None
    return parse_recipe(apply_overrides(raw, overrides or []), str(path))
