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
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.binary.codes import check_packable
from trainer.binary.heads import SHARING, Sharing, check_bits
from trainer.errors import UserError
from trainer.grid import Grid, parse_cells

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
class LoraConfig:
    """``model.lora``: train LoRA adapters instead of every weight (Hu et al. 2022, "LoRA: Low-Rank Adaptation of
    Large Language Models"; ``trainer.lora``). Each targeted linear layer ``W`` becomes ``W + (alpha / r) B A`` with
    rank-``r`` matrices ``A`` (random) and ``B`` (zero at the start), and only ``A`` and ``B`` train. ``dropout``
    applies to the adapter's input; ``target_modules`` is peft's: ``all-linear`` or module names such as
    ``[q_proj, k_proj, v_proj, o_proj]``.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"model.lora.r: {self.r!r} is not valid; give the adapter rank, an integer >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise UserError(f"model.lora.alpha: {self.alpha!r} is not valid; give a number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"model.lora.dropout: {self.dropout!r} is not valid; give a number in [0, 1)")
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise UserError(
                f"model.lora.target_modules: {self.target_modules!r} is not valid; give 'all-linear' or a list of "
                "module names such as [q_proj, v_proj]"
            )


@dataclass
class ModelConfig:
    """The student: any sentence-transformers model by hub id or local path.

    A decoder LLM without a sentence-transformers config (``Qwen/Qwen3-0.6B``) becomes a last-token embedder
    (``trainer.decoder``). ``prompts`` adds to or replaces the model's own prompts by name (``query``,
    ``document``...); training, evaluation and serving all use them. ``lora``: train LoRA adapters only.
    """

    name: str
    revision: str | None = None
    max_seq_length: int | None = None
    trust_remote_code: bool = False
    prompts: dict[str, str] | None = None
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        if self.prompts is not None and (
            not isinstance(self.prompts, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.prompts.items())
        ):
            raise UserError(
                f"model.prompts: {self.prompts!r} is not valid; give a mapping of prompt names to strings, e.g. "
                '{query: "Instruct: Given a web search query, retrieve relevant passages\nQuery: ", document: ""}'
            )
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            self.lora = build_section(LoraConfig, self.lora, "model.lora")


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
    """2D Matryoshka settings (``trainer.train.losses.matryoshka2d``).

    The trained cells are every dim of the last layer (plain Matryoshka truncation of the full model) plus
    the earlier-layer cells of ``cells`` (e.g. ``[L1-D32, L2-D64, L3-D128]``) or ``layers`` x ``dims``;
    ``type`` says how they are used (``starbucks``: the listed cells every step; ``grid``: every layer x dim
    every step, all layers when ``layers`` is absent; ``2dmse``: sampled per step). The objective is
    ``full_weight`` x the full cell's InfoNCE + ``dims_weight`` x the mean over the last layer's smaller
    dims + ``layers_weight`` x the mean over the earlier-layer cells + ``kl_weight`` x the mean KL of each
    cell to the full cell. ``contrastive_weight: 0`` turns this term off (label-free distillation).
    """

    type: Literal["starbucks", "2dmse", "grid"] = "starbucks"
    cells: list[str] | None = None
    layers: list[int] | None = None
    dims: list[int] | None = None
    scale: float = 20.0
    symmetric: bool = False
    gather_across_devices: bool = True
    contrastive_weight: float = 1.0
    full_weight: float = 1.0
    dims_weight: float = 1.0
    layers_weight: float = 1.0
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
        for name in ("contrastive_weight", "full_weight", "dims_weight", "layers_weight", "kl_weight"):
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
            cells = parse_cells(self.cells, key="cells") if self.cells is not None else None
            grid = Grid.from_spec(cells=cells, layers=layers, dims=self.dims)
            if self.type == "starbucks" and self.cells is not None:
                grid.check_nested()
            grid.check_fits(num_layers, embedding_dim)
        except UserError as error:
            raise UserError(f"loss.{error}") from None
        return grid


SELF_TEACHER = "self"
MODES = ("joint", "head-only")


@dataclass
class BinaryConfig:
    """The recipe's ``binary:`` section.

    ``bits``: the code depths trained (and later servable), e.g. ``[1, 2, 4]``; the head has
    ``max(bits) - 1`` residual steps and a loss at every listed depth. ``hidden``: width of every MLP block.
    ``sharing``: ``dim`` or ``cell`` (see the module docstring). ``mode``: ``joint`` (encoder and heads
    together, ``trainer.losses.binary``) or ``head-only`` (frozen encoder, ``trainer.head_only``).
    ``weight`` / ``kl_weight`` / ``kl_temperature`` / ``scale``: the weight of the code InfoNCE group (its mean
    over cells and depths), of the KL-to-the-float-cell group, the KL temperature, and the logit scale
    (1 / temperature) of the InfoNCE. ``encoder_grad``: how much of the codes' gradient reaches the encoder in
    joint training (0: the codes never move it, 1: fully). ``lr``: the heads' learning rate, in both modes
    (not the encoder's fine-tuning rate). Head-only settings: ``steps``, ``batch_size``, ``weight_decay``,
    ``max_texts`` (cap on the number of raw texts encoded, None = all), ``seed``, ``cache_dir`` (where float
    embeddings are cached, None = ``<output_dir>/binary_heads_cache``).
    """

    bits: list[int] = field(default_factory=lambda: [1, 2, 4])
    hidden: int = 512
    sharing: Sharing = "dim"
    mode: Literal["joint", "head-only"] = "joint"
    weight: float = 1.0
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    scale: float = 20.0
    encoder_grad: float = 1.0
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_texts: int | None = None
    seed: int = 42
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits, key="binary.bits")
        if self.sharing not in SHARING:
            raise UserError(f"binary.sharing: {self.sharing!r} is not valid; use one of {list(SHARING)}")
        if self.mode not in MODES:
            raise UserError(f"binary.mode: {self.mode!r} is not valid; use one of {list(MODES)}")
        for key in ("hidden", "steps", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"binary.{key}: {value!r} is not valid; use a positive integer")
        if self.batch_size < 2:
            raise UserError(f"binary.batch_size: {self.batch_size} is not valid; in-batch InfoNCE needs >= 2")
        for key in ("scale", "kl_temperature", "lr"):
            if getattr(self, key) <= 0:
                raise UserError(f"binary.{key}: {getattr(self, key)!r} is not valid; use a number > 0")
        if not 0 <= self.encoder_grad <= 1:
            raise UserError(f"binary.encoder_grad: {self.encoder_grad!r} is not valid; use a number in [0, 1]")
        for key in ("weight", "kl_weight", "weight_decay"):
            if getattr(self, key) < 0:
                raise UserError(f"binary.{key}: {getattr(self, key)!r} is not valid; use a number >= 0")
        if self.max_texts is not None and self.max_texts < 2:
            raise UserError(f"binary.max_texts: {self.max_texts!r} is not valid; use None or an integer >= 2")

    def check_dims(self, dims: Iterable[int]) -> None:
        """Raise UserError when a grid dim cannot be packed into whole bytes."""
        for dim in dims:
            try:
                check_packable(dim)
            except UserError as error:
                raise UserError(f"binary: grid dim {dim} cannot get binary codes: {error}") from error


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/elastic-embeddings/teacher`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "elastic-embeddings", "teacher")


def _positive_int(key: str, value: object, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or null" if optional else "")
        raise UserError(f"distill.{key}: {value!r} is not valid; give {allowed}")


@dataclass
class DistillConfig:
    """The recipe's ``distill:`` section (loss weights and margin: Zhang et al. 2024, Jasper and Stella).

    ``teacher`` is a sentence-transformers hub id, a local path, or ``"self"`` (a frozen copy of the
    student's starting weights). ``max_seq_length`` None keeps the teacher's own; ``prompt`` None uses the
    teacher's default prompt, if its config names one. ``relative_max_pairs`` bounds the relative loss's
    pair list (see ``relative_similarity_loss``). ``projection_lr`` is the learning rate of the randomly
    initialised projection to the teacher's width (when widths differ): it must fit the student quickly,
    not the student fit a random projection.
    """

    teacher: str
    cosine_weight: float = 10.0
    similarity_weight: float = 200.0
    relative_weight: float = 20.0
    margin: float = 0.015
    max_seq_length: int | None = None
    prompt: str | None = None
    cache_dir: str = field(default_factory=default_cache_dir)
    batch_size: int = 64
    trust_remote_code: bool = False
    relative_max_pairs: int | None = 2048
    projection_lr: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise UserError(
                f"distill.teacher: {self.teacher!r} is not valid; give a sentence-transformers hub id, a path or 'self'"
            )
        weights = ("cosine_weight", "similarity_weight", "relative_weight", "margin", "projection_lr")
        for key in weights:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"distill.{key}: {value!r} is not valid; give a number >= 0")
        if not (self.cosine_weight or self.similarity_weight or self.relative_weight):
            raise UserError("distill: cosine_weight, similarity_weight and relative_weight are all 0; set one > 0")
        _positive_int("max_seq_length", self.max_seq_length, optional=True)
        _positive_int("batch_size", self.batch_size)
        _positive_int("relative_max_pairs", self.relative_max_pairs, optional=True)
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise UserError(f"distill.prompt: {self.prompt!r} is not valid; give a string or null")
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
            raise UserError(f"distill.cache_dir: {self.cache_dir!r} is not valid; give a folder path")
        if not isinstance(self.trust_remote_code, bool):
            raise UserError(f"distill.trust_remote_code: {self.trust_remote_code!r} is not valid; give true or false")

    def teacher_name(self, student_model_id: str) -> str:
        """The model to load as teacher: ``student_model_id`` for ``"self"``, else ``teacher``."""
        return student_model_id if self.teacher == SELF_TEACHER else self.teacher


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    training: dict[str, Any]
    binary: BinaryConfig | None = None
    distill: DistillConfig | None = None
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
        binary = build_section(BinaryConfig, raw["binary"], "binary")
    if raw.get("distill") is not None:
        distill = build_section(DistillConfig, raw["distill"], "distill")
    if model.lora is not None and binary is not None and binary.mode == "head-only":
        raise UserError("model.lora: binary.mode head-only keeps the encoder frozen, so adapters would not train")
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
