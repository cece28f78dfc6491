"""YAML recipes: parsed, overridden from the command line and validated before any model or data loads.

A recipe has the sections ``model``, ``data``, ``loss``, ``training`` (every
``SentenceTransformerTrainingArguments`` field) and optionally ``binary`` (recurrent binarization heads),
``distill`` (teacher distillation) and ``evaluation`` (per-cell nDCG@10 on dev sets during training).
``--key value`` overrides a training argument, ``--section.key value`` any other field. Every value, in the
file or on the command line, gets its field's type the way ``HfArgumentParser`` gives it
(``trainer.settings``): ``--save_strategy no`` is the string ``"no"``, ``--learning_rate 1e-4`` a float,
``--loss.cells L2-D64,L6-D384`` a list. The training arguments are then built once
(``SentenceTransformerTrainingArguments`` checks their combinations) and their values checked (learning
rate > 0, batch sizes >= 1, ...), and the output folder must be writable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

from trainer.beir import check_folder
from trainer.binary.codes import check_packable
from trainer.binary.heads import SHARING, BinaryHeads, Sharing, check_bits, depth_shares
from trainer.errors import UserError
from trainer.grid import FLOAT_BITS, Cell, Grid, parse_cells
from trainer.outputs import check_writable_folder
from trainer.serve.checkpoint import model_shape
from trainer.settings import Plain, build_dataclass, did_you_mean, field_types, read_yaml, typed_value
from trainer.train.losses.distill import distils

logger = logging.getLogger(__name__)

LOSS_TYPES = ("starbucks", "2dmse", "grid")


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
            self.lora = build_dataclass(LoraConfig, self.lora, "model.lora")


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
    cell to the full cell (of each earlier-layer cell only, with ``kl_last_layer: false``).
    ``contrastive_weight: 0`` turns this term off (label-free distillation).
    ``mini_batch_size``: gradient caching (``trainer.train.losses.elastic.ElasticLoss``): batches larger than
    this are embedded this many texts at a time, so memory stays that of this size whatever the batch size;
    null (default) embeds each column of the batch at once.
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
    kl_last_layer: bool = True
    n_layers_per_step: int = 1
    n_dims_per_step: int = 1
    seed: int = 42
    mini_batch_size: int | None = None

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
        size = self.mini_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UserError(f"loss.mini_batch_size: {size!r} is not valid; give a positive integer or null")

    def grid(self, num_layers: int, embedding_dim: int) -> Grid:
        """The cells to train, checked against the model's depth and width."""
        layers = self.layers
        if self.type == "grid" and layers is None and self.cells is None:
            layers = list(range(1, num_layers + 1))
        try:
            grid = Grid.from_spec(cells=self.cells, layers=layers, dims=self.dims)
            if grid.code_bits:
                raise UserError(
                    f"cells: {[str(c) for c in grid.listed if not c.is_float]} name code bits; list the trained "
                    "cells as L<layers>-D<dims> and give the code depths under binary.bits"
                )
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
    ``max(bits) - 1`` residual steps and a loss at every listed depth. ``hidden``: width of every MLP block
    (0: no blocks; the heads are then the residual sign quantiser and the code terms train only the encoder).
    ``sharing``: ``dim`` or ``cell`` (see the module docstring). ``mode``: ``joint`` (encoder and heads
    together, ``trainer.losses.binary``) or ``head-only`` (frozen encoder, ``trainer.head_only``).
    ``weight`` / ``kl_weight`` / ``kl_temperature`` / ``scale``: the weight of the code InfoNCE group (its mean
    over cells and depths), of the KL-to-the-float-cell group, the KL temperature, and the logit scale
    (1 / temperature) of the InfoNCE. ``bit_weights``: one relative weight per depth of ``bits`` inside both
    code groups (None: equal); e.g. ``[2, 1, 1]`` gives the 1-bit code half of each group. ``encoder_grad``:
    how much of the codes' gradient reaches the encoder in joint training (0: the codes never move it, 1:
    fully). ``lr``: the heads' learning rate, in both modes (not the encoder's fine-tuning rate); in joint mode
    ``0`` keeps the heads at their start, the parameter-free residual sign quantiser, so that only the encoder
    learns from the code terms. Head-only settings: ``steps``, ``batch_size``, ``weight_decay``, ``max_texts``
    (cap on the number of raw texts encoded, None = all), ``seed``, ``cache_dir`` (where float embeddings are
    cached, None = ``<output_dir>/binary_heads_cache``), ``holdout`` (the share of the data kept out of training
    to check the heads against the parameter-free quantiser afterwards; a head that ranks it worse is reset to
    that quantiser, ``trainer.train.holdout``; 0 trains on everything and checks nothing).
    """

    bits: list[int] = field(default_factory=lambda: [1, 2, 4])
    hidden: int = 512
    sharing: Sharing = "dim"
    mode: Literal["joint", "head-only"] = "joint"
    weight: float = 1.0
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    scale: float = 20.0
    bit_weights: list[float] | None = None
    encoder_grad: float = 1.0
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_texts: int | None = None
    seed: int = 42
    cache_dir: str | None = None
    holdout: float = 0.1

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits, key="binary.bits")
        depth_shares(self.bits, self.bit_weights, key="binary.bit_weights")  # validates; None is valid
        if self.sharing not in SHARING:
            raise UserError(f"binary.sharing: {self.sharing!r} is not valid; use one of {list(SHARING)}")
        if self.mode not in MODES:
            raise UserError(f"binary.mode: {self.mode!r} is not valid; use one of {list(MODES)}")
        if not isinstance(self.hidden, int) or self.hidden < 0:
            raise UserError(
                f"binary.hidden: {self.hidden!r} is not valid; use 0 (no learned blocks) or a positive integer"
            )
        if self.hidden == 0 and self.mode == "head-only":
            raise UserError("binary.hidden: 0 leaves nothing to learn in head-only mode; give a width, e.g. 512")
        for key in ("steps", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"binary.{key}: {value!r} is not valid; use a positive integer")
        if self.batch_size < 2:
            raise UserError(f"binary.batch_size: {self.batch_size} is not valid; in-batch InfoNCE needs >= 2")
        for key in ("scale", "kl_temperature"):
            if getattr(self, key) <= 0:
                raise UserError(f"binary.{key}: {getattr(self, key)!r} is not valid; use a number > 0")
        if self.lr < 0 or (self.lr == 0 and self.mode == "head-only"):
            allowed = "> 0 in head-only mode" if self.mode == "head-only" else ">= 0 (0 keeps the heads fixed)"
            raise UserError(f"binary.lr: {self.lr!r} is not valid; use a number {allowed}")
        if not 0 <= self.encoder_grad <= 1:
            raise UserError(f"binary.encoder_grad: {self.encoder_grad!r} is not valid; use a number in [0, 1]")
        for key in ("weight", "kl_weight", "weight_decay"):
            if getattr(self, key) < 0:
                raise UserError(f"binary.{key}: {getattr(self, key)!r} is not valid; use a number >= 0")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int | float) or not 0 <= self.holdout < 0.5:
            raise UserError(f"binary.holdout: {self.holdout!r} is not valid; use a share in [0, 0.5), e.g. 0.1")
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
    not the student fit a random projection. ``layers`` lists the layer exits whose cells (and their codes)
    are distilled; None distils every cell. The cosine term belongs to the full cell, so it applies only
    when the last layer is listed. A mapping ``{layer: weight}`` gives each listed layer its own share of the
    terms (``DistillationLoss``): ``{6: 1.0, 1: 0.25}`` distils the last layer as ``[6]`` does and adds the
    first layer's cells at a quarter of that.
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
    layers: list[int] | dict[int, float] | None = None

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
        if self.layers is not None and (not self.layers or min(self.layers) < 1):
            raise UserError(
                f"distill.layers: {self.layers!r} is not valid; give a non-empty list of layer exits "
                "(positive integers, e.g. [1, 2, 3]), a mapping of layer exit to weight (e.g. {6: 1.0, 1: 0.25}) "
                "or null for every layer"
            )
        if isinstance(self.layers, dict):
            for layer, weight in self.layers.items():
                if not weight > 0:
                    raise UserError(
                        f"distill.layers.{layer}: {weight!r} is not valid; give a weight > 0 (leave the layer out "
                        "to not distil it)"
                    )

    def check_layers(self, num_layers: int) -> None:
        """Every listed layer exit exists in a model of ``num_layers`` layers, and something is distilled."""
        if self.layers is None:
            return
        if max(self.layers) > num_layers:
            raise UserError(f"distill.layers: {self.layers} is not valid; the model has layers 1..{num_layers}")
        if not distils(self.layers, num_layers) and not (self.similarity_weight or self.relative_weight):
            raise UserError(
                f"distill.layers: {self.layers} leaves only the cosine term, which needs the last layer "
                f"({num_layers}); list it or set similarity_weight or relative_weight > 0"
            )

    def teacher_name(self, student_model_id: str) -> str:
        """The model to load as teacher: ``student_model_id`` for ``"self"``, else ``teacher``."""
        return student_model_id if self.teacher == SELF_TEACHER else self.teacher


_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
EVAL_METRIC = "ndcg@10"


def cell_metric(sets: list[str], what: str) -> str:
    """The evaluator's name of nDCG@10 of ``what`` (a cell such as ``L3-D128-B1``, or ``mean`` over cells) over
    dev ``sets``: ``<set>_ndcg@10_<what>`` for one set, ``ndcg@10_<what>`` for the mean over several. The
    Trainer logs it with the prefix ``eval_``."""
    return f"{sets[0]}_{EVAL_METRIC}_{what}" if len(sets) == 1 else f"{EVAL_METRIC}_{what}"


@dataclass
class EvalSetConfig:
    """One dev set of the ``evaluation:`` section: the ``split`` of a BEIR folder.

    ``max_queries`` / ``max_docs`` cap its size: ``max_queries`` judged queries drawn with ``seed``, and every
    document judged for them plus random others up to ``max_docs`` (a judged document is never dropped). The
    capped set is written as a BEIR folder ``<output_dir>/eval/sets/<name>``, so ``python -m eval grid`` can
    score exactly what training logged. ``name`` (default ``<folder>-<split>``) names the logged metrics.
    """

    beir: str
    split: str = "test"
    name: str | None = None
    max_queries: int | None = None
    max_docs: int | None = None
    seed: int = 42

    @property
    def label(self) -> str:
        return self.name or f"{Path(self.beir).name}-{self.split}"

    def check(self, key: str) -> None:
        for name in ("max_queries", "max_docs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"{key}.{name}: {value!r} is not valid; give a positive integer or null")
        if not _SET_NAME.match(self.label):
            raise UserError(f"{key}.name: {self.label!r} is not valid; use letters, digits, '_', '.' and '-'")
        try:
            check_folder(self.beir, self.split)
        except UserError as error:
            raise UserError(f"{key}.beir: {error}") from None


@dataclass
class EvaluationConfig:
    """The recipe's ``evaluation:`` section: nDCG@10 of cells during training (``eval.cell_evaluator``).

    ``sets``: dev sets (``EvalSetConfig``); ``cells``: the (layer, dim) cells scored (default: the trained
    cells and the full cell); ``bits``: their depths, 32 = float (default: float and the ``binary`` depths);
    ``batch_size``: encoding batch size; ``primary``: a cell, or ``mean`` over the scored cells, whose metric
    is the evaluator's ``primary_metric`` and the default ``metric_for_best_model`` with
    ``load_best_model_at_end``. Metrics are logged as ``eval_<set>_ndcg@10_<cell>`` and
    ``eval_<set>_ndcg@10_mean`` (``cell_metric``); ``training.metric_for_best_model`` may name any of them.
    """

    sets: list[EvalSetConfig]
    cells: list[str] | None = None
    bits: list[int] | None = None
    batch_size: int = 64
    primary: str = "mean"

    def grid(self, trained: Grid, full: Cell, code_bits: Iterable[int]) -> Grid:
        """The cells and depths to score: as configured, else the trained cells, the full cell and depths."""
        cells = parse_cells(self.cells, key="evaluation.cells") if self.cells else sorted({*trained.cells, full})
        return Grid(tuple(cells), tuple(sorted({*(self.bits or [FLOAT_BITS, *code_bits])})))

    def primary_cell(self, grid: Grid) -> str:
        """``mean`` or the canonical name of the configured primary cell, which must be scored."""
        if self.primary == "mean":
            return self.primary
        cell = str(Cell.parse(self.primary, key="evaluation.primary"))
        if cell not in {str(c) for c in grid.all_cells()}:
            raise UserError(f"evaluation.primary: {cell} is not scored; use 'mean' or one of the evaluation cells")
        return cell


def check_evaluation(recipe: Recipe, trained: Grid, num_layers: int, embedding_dim: int) -> None:
    """Validate the ``evaluation`` section against the model, the trained grid and the binary heads."""
    evaluation = recipe.evaluation
    if not evaluation.sets:
        raise UserError("evaluation.sets: empty; list at least one dev set, e.g. {beir: ../shared/data/cranfield}")
    for i, dev_set in enumerate(evaluation.sets):
        dev_set.check(f"evaluation.sets[{i}]")
    labels = [s.label for s in evaluation.sets]
    if len(set(labels)) != len(labels):
        raise UserError(f"evaluation.sets: names {labels} repeat; give each set its own 'name'")
    size = evaluation.batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"evaluation.batch_size: {size!r} is not valid; give a positive integer")
    if recipe.binary is not None and recipe.binary.mode == "head-only":
        raise UserError("evaluation: head-only binary training runs no Trainer; score it with `python -m eval grid`")
    if recipe.training.get("eval_strategy", "no") in ("no", None):  # as the Trainer does: no evaluation runs
        logger.warning("evaluation: training.eval_strategy is 'no', so the per-cell evaluation will not run")
    full = Cell(num_layers, embedding_dim)
    try:
        grid = evaluation.grid(trained, full, recipe.binary.bits if recipe.binary else [])
        grid.check_fits(num_layers, embedding_dim)
    except UserError as error:
        raise UserError(f"evaluation.{error}") from None
    heads = None
    if recipe.binary is not None:  # what the trained heads will serve (their width does not matter here)
        binary = recipe.binary
        heads = BinaryHeads({*trained.dims, full.dim}, binary.bits, 1, binary.sharing, {*trained.layers, full.layers})
    for cell in grid.all_cells():
        if not cell.is_float:
            try:
                if heads is not None:
                    heads.check_serves(cell)
                else:
                    check_packable(cell.dim)  # the parameter-free residual sign quantiser serves any depth
            except UserError as error:
                raise UserError(f"evaluation.cells: {cell}: {error}") from None
    primary = cell_metric(labels, evaluation.primary_cell(grid))
    best = recipe.training.get("metric_for_best_model")
    if not best and recipe.training.get("load_best_model_at_end"):
        recipe.training["metric_for_best_model"] = f"eval_{primary}"
    elif best and f"{EVAL_METRIC}_" in str(best):
        scopes = [[label] for label in labels] + ([labels] if len(labels) > 1 else [])
        valid = [f"eval_{cell_metric(scope, c)}" for scope in scopes for c in [*map(str, grid.all_cells()), "mean"]]
        if str(best) not in valid and f"eval_{best}" not in valid:
            raise UserError(
                f"training.metric_for_best_model: {best!r} is not logged; use e.g. {valid[0]!r} (one cell) or "
                f"{valid[-1]!r}"
            )


@dataclass
class WiseFtConfig:
    """``wise_ft``: after training, move the encoder's weights back toward the base model's,
    ``theta = alpha * theta_tuned + (1 - alpha) * theta_base`` (Wortsman et al. 2022, "Robust fine-tuning of
    zero-shot models", WiSE-FT; ``trainer.train.wise_ft``). ``alpha`` is the share of the fine-tuned weights:
    1 keeps them as trained, smaller values keep more of the base model, which the fine-tuning data can pull
    too far (here: the last layer's cells over-fit long before the earlier layers' cells stop gaining).
    """

    alpha: float

    def __post_init__(self) -> None:
        check_alpha(self.alpha, "wise_ft.alpha")


def check_alpha(alpha: object, key: str) -> None:
    """A WiSE-FT share of the fine-tuned weights: a number in (0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise UserError(f"{key}: {alpha!r} is not valid; give the share of the fine-tuned weights, a number in (0, 1]")


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    training: dict[str, Any]
    binary: BinaryConfig | None = None
    distill: DistillConfig | None = None
    evaluation: EvaluationConfig | None = None
    wise_ft: WiseFtConfig | None = None
    path: str = ""

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])


@cache
def section_classes() -> dict[str, type]:
    """Recipe section name -> its config dataclass (``training`` is a mapping of training arguments)."""
    sections = {}
    for name, hint in field_types(Recipe).items():
        classes = [arg for arg in (get_args(hint) or (hint,)) if dataclasses.is_dataclass(arg)]
        if classes:
            sections[name] = classes[0]
    return sections


# Keys this project reads itself; ``resume_from_checkpoint: true`` (a YAML boolean) means the latest checkpoint.
OUR_TRAINING_KEYS = {"overwrite_output_dir": bool, "resume_from_checkpoint": bool | str | None}
NOT_TRAINING_ARGUMENTS = ("overwrite_output_dir", "resume_from_checkpoint")  # handled by trainer.train.run
STEPS = "a number > 0 (a fraction of the total steps when < 1)"
TRAINING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "num_train_epochs": (lambda v: v > 0, "a number > 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 to train num_train_epochs"),
    "per_device_train_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "an integer >= 1"),
    "warmup_steps": (lambda v: v >= 0, "a number >= 0 (a fraction of the total steps when < 1)"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0"),
    "adam_epsilon": (lambda v: v > 0, "a number > 0"),
    "logging_steps": (lambda v: v > 0, STEPS),
    "save_steps": (lambda v: v > 0, STEPS),
    "eval_steps": (lambda v: v > 0, STEPS),
    "save_total_limit": (lambda v: v >= 1, "an integer >= 1, or null to keep every checkpoint"),
    "dataloader_num_workers": (lambda v: v >= 0, "an integer >= 0"),
}


@cache
def training_types() -> dict[str, Any]:
    """The type of every training argument: the fields of ``SentenceTransformerTrainingArguments`` plus ours."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    return {**field_types(SentenceTransformerTrainingArguments), **OUR_TRAINING_KEYS}


def training_value(name: str, value: Any, key: str) -> Any:
    """One training argument typed by its dataclass field and checked against ``TRAINING_CHECKS``."""
    types = training_types()
    if name not in types:
        raise UserError(
            f"{key}: unknown key{did_you_mean(name, list(types))}; valid keys are the fields of "
            "SentenceTransformerTrainingArguments plus overwrite_output_dir"
        )
    value = typed_value(value, types[name], key)
    valid, description = TRAINING_CHECKS.get(name, (None, ""))
    if valid is not None and value is not None and not valid(value):
        raise UserError(f"{key}: {value!r} is not valid; give {description}")
    return value


def training_arguments(training: dict[str, Any]):
    """The ``SentenceTransformerTrainingArguments`` of a recipe's training mapping; their own checks of how
    the arguments combine (strategies, precision, reporting integrations) become a ``UserError``."""
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from transformers.integrations import get_reporting_integration_callbacks

    arguments = {k: v for k, v in training.items() if k not in NOT_TRAINING_ARGUMENTS}
    if not torch.accelerator.is_available():  # pinned memory needs an accelerator; torch warns otherwise
        arguments.setdefault("dataloader_pin_memory", False)
    try:
        args = SentenceTransformerTrainingArguments(**arguments)
        get_reporting_integration_callbacks(args.report_to)
    except (ValueError, TypeError, OSError, NotImplementedError) as error:
        raise UserError(f"training: {error}") from None
    return args


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--key value`` / ``--key=value`` pairs, each value typed by its field (``--learning-rate``
    works too); plain keys are training arguments, ``--section.key`` any other field. A list field also
    takes several values: ``--loss.cells L2-D64 L6-D384``."""
    tokens = list(overrides)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or token == "--":
            raise UserError(f"command line: expected --key value, got {token!r}")
        key, has_value, value = token[2:].partition("=")
        values = [value] if has_value else []
        while tokens and not tokens[0].startswith("--"):
            values.append(tokens.pop(0))
        if not values:
            raise UserError(f"command line: --{key} needs a value")
        text = Plain(values[0]) if len(values) == 1 else [Plain(v) for v in values]
        section, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        if not section:
            raw.setdefault("training", {})
            raw["training"] = raw["training"] if raw["training"] is not None else {}
            raw["training"][name] = training_value(name, text, f"--{key}")
            continue
        classes = section_classes()
        if section not in classes:
            raise UserError(
                f"--{key}: unknown section {section!r}{did_you_mean(section, list(classes))}; "
                f"valid: {', '.join(classes)}, or a training argument without a section"
            )
        types = field_types(classes[section])
        if name not in types:
            raise UserError(f"--{key}: unknown key{did_you_mean(name, list(types))}; valid keys: {', '.join(types)}")
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise UserError(f"--{key}: the recipe's {section!r} is not a mapping of settings")
        raw[section][name] = typed_value(text, types[name], f"--{key}")
    return raw


def parse_recipe(raw: dict[str, Any], path: str = "") -> Recipe:
    """Build and validate a recipe from its mapping; reads model config files but loads no weights."""
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'recipe'}: expected a YAML mapping at the top level")
    sections = [f.name for f in dataclasses.fields(Recipe) if f.name != "path"]
    for name in raw:
        if name not in sections:
            raise UserError(
                f"{name}: unknown section{did_you_mean(str(name), sections)}; valid sections: {', '.join(sections)}"
            )
    for name in ("model", "data", "training"):
        if name not in raw:
            raise UserError(f"{name}: missing section; a recipe needs model, data and training")
    model = build_dataclass(ModelConfig, raw["model"], "model")
    data_raw = raw["data"] if isinstance(raw["data"], dict) else {}
    if not data_raw.get("train"):
        raise UserError("data.train: no training data; list at least one source (beir, hub, path or texts)")
    data = build_dataclass(DataConfig, data_raw, "data")
    loss = build_dataclass(LossConfig, raw.get("loss"), "loss")
    training = check_training(raw["training"])
    binary = distill = None
    if raw.get("binary") is not None:
        binary = build_dataclass(BinaryConfig, raw["binary"], "binary")
    if raw.get("distill") is not None:
        distill = build_dataclass(DistillConfig, raw["distill"], "distill")
    if model.lora is not None and binary is not None and binary.mode == "head-only":
        raise UserError("model.lora: binary.mode head-only keeps the encoder frozen, so adapters would not train")
    evaluation = None
    if raw.get("evaluation") is not None:
        section = raw["evaluation"]
        if isinstance(section, dict) and isinstance(section.get("sets"), dict):  # one dev set
            section = {**section, "sets": [section["sets"]]}
        evaluation = build_dataclass(EvaluationConfig, section, "evaluation")
    if loss.contrastive_weight == 0 and distill is None and binary is None:
        raise UserError("loss.contrastive_weight: 0 leaves nothing to train; add a distill or binary section")
    label_free = [s.label for s in data.train if s.texts]
    if label_free and distill is None and (binary is None or binary.mode != "head-only"):
        raise UserError(f"data.train: {label_free} are label-free texts; they need a distill section to train on")
    wise_ft = build_dataclass(WiseFtConfig, raw["wise_ft"], "wise_ft") if raw.get("wise_ft") is not None else None
    if wise_ft is not None and binary is not None and binary.mode == "head-only":
        raise UserError("wise_ft: binary.mode head-only keeps the encoder frozen, so there is nothing to merge")
    recipe = Recipe(model, data, loss, training, binary, distill, evaluation, wise_ft, path)
    num_layers, embedding_dim = model_shape(model.name, model.revision, key="model.name")
    grid = loss.grid(num_layers, embedding_dim)
    if binary is not None:
        binary.check_dims([*grid.dims, embedding_dim])
    if distill is not None:
        distill.check_layers(num_layers)
    if evaluation is not None:
        check_evaluation(recipe, grid, num_layers, embedding_dim)
    return recipe


def check_training(training: Any) -> dict[str, Any]:
    """The training mapping with every value typed and checked, checked together by building the training
    arguments, and an output folder that can be written."""
    if not isinstance(training, dict):
        raise UserError(f"training: expected a mapping of SentenceTransformerTrainingArguments, got {training!r}")
    typed = {str(name): training_value(str(name), value, f"training.{name}") for name, value in training.items()}
    if not typed.get("output_dir"):
        raise UserError("training.output_dir: missing; say where checkpoints go, e.g. runs/my-model")
    check_writable_folder(typed["output_dir"], key="training.output_dir")
    training_arguments(typed)
    return typed


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe: {str(path)!r} does not exist; see configs/ for examples")
    raw = read_yaml(path, key="recipe")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {path} must be a YAML mapping of sections (model, data, loss, training, ...)")
    return parse_recipe(apply_overrides(raw, overrides or []), str(path))
