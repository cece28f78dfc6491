"""Run a recipe: validate, load data, build the loss, train with sentence-transformers' Trainer."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from torch import nn
from transformers import TrainerCallback, TrainerControl, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import embedding_dim, num_layers
from trainer.decoder import column_prompts
from trainer.errors import UserError
from trainer.grid import Cell, CellSelection, Grid
from trainer.manifest import write_manifest
from trainer.train.data import load_sources, text_columns
from trainer.train.head_only import CHECKPOINT_STATE, train_heads_only
from trainer.train.losses import ElasticLoss, InfoNCELoss, Matryoshka2dLoss
from trainer.train.losses.binary import BinaryCodeLoss, EmbeddingToEmbeddingLoss
from trainer.train.losses.distill import DistillationLoss, distils
from trainer.train.recipe import Recipe, load_recipe, training_arguments
from trainer.train.student import load_model
from trainer.train.summary import log_summary, run_summary
from trainer.train.wise_ft import interpolate_with_base

logger = logging.getLogger(__name__)

SELECTION_FILE = "cell_selection.json"


def resolve_resume(recipe: Recipe) -> str | None:
    """``resume_from_checkpoint``: a checkpoint folder, or ``true`` for the latest complete one in output_dir."""
    resume = recipe.training.get("resume_from_checkpoint")
    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True"):
        last = last_complete_checkpoint(recipe)
        if last is None:
            raise UserError(
                f"training.resume_from_checkpoint: no complete checkpoint-* folder in {str(recipe.output_dir)!r}"
            )
        return last
    if not Path(resume).is_dir():
        raise UserError(f"training.resume_from_checkpoint: {resume!r} is not a checkpoint folder")
    return str(resume)


def last_complete_checkpoint(recipe: Recipe) -> str | None:
    """The newest ``checkpoint-<step>`` folder of output_dir whose saving finished, i.e. that holds the file
    written into it last (the Trainer's ``trainer_state.json``, after the loss state and the model; head-only
    training's state). A run killed while saving leaves its newest folder incomplete; that one is skipped with
    a warning."""
    head_only = recipe.binary is not None and recipe.binary.mode == "head-only"
    marker = CHECKPOINT_STATE if head_only else TRAINER_STATE_NAME
    folders = [f for f in recipe.output_dir.glob("checkpoint-*") if f.name.split("-", 1)[1].isdigit()]
    for folder in sorted(folders, key=lambda f: int(f.name.split("-", 1)[1]), reverse=True):
        if (folder / marker).is_file():
            return str(folder)
        logger.warning("%s is incomplete (the run stopped while saving it); an earlier checkpoint is used", folder)
    return None


def prepare_output_dir(recipe: Recipe, resume: str | None, is_main_process: bool = True) -> None:
    """Never overwrite a run silently: a non-empty output_dir needs a resume or an explicit overwrite (checked,
    and acted on, by the main process)."""
    out = recipe.output_dir
    overwrite = recipe.training.get("overwrite_output_dir") in (True, "true", "True")
    if resume or not out.is_dir() or not any(out.iterdir()) or not is_main_process:
        return
    if not overwrite:
        raise UserError(
            f"training.output_dir: {str(out)!r} already holds a run; pass --resume_from_checkpoint true to continue "
            "it, --overwrite_output_dir true to replace it, or choose another output_dir"
        )
    logger.warning("overwrite_output_dir: removing the previous run in %s", out)
    shutil.rmtree(out)


def build_loss(recipe: Recipe, model: SentenceTransformer, grid: Grid, teacher_dim: int | None = None) -> ElasticLoss:
    """The recipe's terms (2D Matryoshka contrastive, binary codes, distillation) around one forward pass."""
    config = recipe.loss
    full = Cell(num_layers(model), embedding_dim(model))
    selection = CellSelection(grid, full, config.type, config.n_layers_per_step, config.n_dims_per_step, config.seed)
    contrastive = InfoNCELoss(config.scale, config.symmetric, config.gather_across_devices)
    terms: dict[str, nn.Module] = {}
    heads = None
    if config.contrastive_weight > 0:
        terms["matryoshka"] = Matryoshka2dLoss(
            contrastive,
            full_weight=config.contrastive_weight * config.full_weight,
            dims_weight=config.contrastive_weight * config.dims_weight,
            layers_weight=config.contrastive_weight * config.layers_weight,
            kl_weight=config.contrastive_weight * config.kl_weight,
            kl_temperature=config.kl_temperature,
            kl_last_layer=config.kl_last_layer,
        )
    if recipe.binary is not None:
        binary = recipe.binary
        heads = BinaryHeads(
            dims={*grid.dims, full.dim},
            bits=binary.bits,
            hidden=binary.hidden,
            sharing=binary.sharing,
            layers={*grid.layers, full.layers},
        )
        heads.requires_grad_(binary.lr > 0)  # lr 0: the residual sign quantiser stays as it is
        code_contrastive = InfoNCELoss(binary.scale, config.symmetric, config.gather_across_devices)
        terms["binary"] = BinaryCodeLoss(
            heads,
            binary.bits,
            code_contrastive,
            binary.weight,
            binary.kl_weight,
            binary.kl_temperature,
            binary.bit_weights,
        )
    if recipe.distill is not None:
        distill, student_dim = recipe.distill, embedding_dim(model)
        terms["distill"] = DistillationLoss(
            student_dim,
            teacher_dim,
            # no cosine term without the full cell, so no projection to train
            distill.cosine_weight if distils(distill.layers, full.layers) else 0.0,
            distill.similarity_weight,
            distill.relative_weight,
            distill.margin,
            distill.relative_max_pairs,
            config.gather_across_devices,
            distill.layers,
        )
    if heads is None:
        return ElasticLoss(model, selection, terms, mini_batch_size=config.mini_batch_size)
    bits, encoder_grad = tuple(recipe.binary.bits), recipe.binary.encoder_grad
    return ElasticLoss(model, selection, terms, heads, bits, encoder_grad, config.mini_batch_size)


class LossStateCallback(TrainerCallback):
    """Keeps the loss's own state with the model: its trainable terms (binarization heads, distillation
    projection) and the random state of the cell selection (``2dmse`` sampling).

    Each term with ``save_pretrained`` is saved into every checkpoint and the final output_dir; the cell
    selection's state into every checkpoint (``cell_selection.json``), so a resumed run samples the cells an
    uninterrupted one would. Under DDP the loss's parameters live outside the wrapped model, so their
    gradients are averaged over processes here before each optimizer step.
    """

    def __init__(self, loss: ElasticLoss) -> None:
        self.loss = loss
        self.own_params = loss.own_parameters()

    def stateful_terms(self) -> list[nn.Module]:
        return [term for term in self.loss.terms.values() if hasattr(term, "save_pretrained")]

    def save(self, folder: str | Path) -> None:
        for term in self.stateful_terms():
            term.save_pretrained(folder)

    def load(self, folder: str | Path) -> None:
        for term in self.stateful_terms():
            term.load_state(folder)
        selection = Path(folder) / SELECTION_FILE
        if selection.is_file():
            self.loss.selection.load_state_dict(json.loads(selection.read_text()))
        elif self.loss.selection.mode == "2dmse":
            raise UserError(f"{selection}: missing; cannot resume the 2dmse cell sampling of this checkpoint")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.own_params and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for param in self.own_params:
                if param.grad is not None:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)

    def on_step_end(self, args, state, control, **kwargs):
        """A checkpoint due now gets the loss state (its terms and the cell selection's state) before the
        Trainer writes its trainer_state.json, so that a run killed while saving never leaves a checkpoint that
        looks complete but lacks them."""
        if control.should_save and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint.mkdir(parents=True, exist_ok=True)
            self.save(checkpoint)
            (checkpoint / SELECTION_FILE).write_text(json.dumps(self.loss.selection.state_dict()))

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        if args.save_strategy == "best":  # decided only when the Trainer saves
            self.on_step_end(args, state, TrainerControl(should_save=True))


def check_launch(args: SentenceTransformerTrainingArguments) -> None:
    """Refuse processes that ``accelerate launch`` started but that would not train together: with a launch
    config for devices the machine lacks (FSDP or multi-GPU on a CPU machine, without ACCELERATE_USE_CPU),
    accelerate gives each process a run of its own, and all would write the same output_dir. FSDP asked for on
    CPU runs as plain DDP over gloo (accelerate shards only on accelerators), which is said once."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise UserError(
            f"accelerate launch: {launched} processes started but the launch config needs a device this machine "
            "lacks, so each would train alone; on CPU launch with ACCELERATE_USE_CPU=true (DDP over gloo), e.g. "
            "--config_file configs/accelerate/cpu-2proc.yaml"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and args.device.type == "cpu":
        logger.warning("accelerate launch: FSDP does not shard on CPU; the processes train with DDP over gloo")


def shards_weights(args: SentenceTransformerTrainingArguments) -> bool:
    """Whether each process holds only a shard of the weights: FSDP on accelerators, DeepSpeed ZeRO-3."""
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return (fsdp and args.device.type != "cpu") or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def train(recipe: Recipe) -> SentenceTransformerTrainer:
    resume = resolve_resume(recipe)
    args = training_arguments(recipe.training)  # sets up the processes of `accelerate launch`
    check_launch(args)
    if recipe.wise_ft is not None and shards_weights(args):
        raise UserError("wise_ft: not supported when FSDP or DeepSpeed ZeRO-3 shard the weights; train with DDP")
    prepare_output_dir(recipe, resume, args.distributed_state.is_main_process)
    train_data = load_sources(recipe.data.train, "data.train")
    eval_data = load_sources(recipe.data.eval, "data.eval") if recipe.data.eval else None
    set_seed(recipe.training.get("seed", 42))  # before the randomly initialised adapters and heads, as HF examples do
    model = load_model(recipe.model)
    grid = recipe.loss.grid(num_layers(model), embedding_dim(model))
    if recipe.binary is not None and recipe.binary.mode == "head-only":
        return train_heads_from_recipe(recipe, model, grid, train_data, resume)
    if not args.prompts:  # train with the prompts evaluation and serving use
        parts = train_data.values() if isinstance(train_data, DatasetDict) else [train_data]
        args.prompts = column_prompts(model, sorted({c for part in parts for c in text_columns(part)})) or None
    teacher_width = None
    if recipe.distill is not None:
        with args.main_process_first(desc="teacher embeddings"):
            train_data = label_with_teacher(train_data, recipe)
            eval_data = label_with_teacher(eval_data, recipe) if eval_data else None
        first = next(iter(train_data.values())) if isinstance(train_data, DatasetDict) else train_data
        teacher_width = len(first[0]["label"][0])
    set_seed(args.seed)  # the loss's own parameters (heads, projection) start the same in every run with this seed
    loss = build_loss(recipe, model, grid, teacher_width)
    if args.process_index == 0:
        log_summary(run_summary(recipe, grid, loss, train_data, num_layers(model), embedding_dim(model)))
    args.learning_rate_mapping = {**loss_learning_rates(recipe, loss), **args.learning_rate_mapping}
    callback = LossStateCallback(loss)
    evaluator = None
    if recipe.evaluation is not None:
        from eval.cell_evaluator import build_evaluator

        with args.main_process_first(desc="evaluation sets"):
            evaluator = build_evaluator(recipe, grid, loss.selection.full, loss.heads)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        loss=loss,
        evaluator=evaluator,
        callbacks=[callback],
    )
    if resume:
        callback.load(resume)
    trainer.train(resume_from_checkpoint=resume)
    if recipe.wise_ft is not None and args.should_save:  # only the process that writes the model loads the base
        interpolate_with_base(model, load_model(recipe.model), recipe.wise_ft.alpha)
    trainer.save_model(str(recipe.output_dir))
    if trainer.is_world_process_zero():
        callback.save(recipe.output_dir)
        write_manifest(recipe, grid, model, loss=loss)
    return trainer


def loss_learning_rates(recipe: Recipe, loss: ElasticLoss) -> dict[str, float]:
    """Learning rates of the loss's own, randomly initialised parameters (parameter-name regex -> rate), so
    they are not trained at the encoder's fine-tuning rate; a recipe's learning_rate_mapping overrides them."""
    rates = {}
    if loss.heads is not None and recipe.binary.lr > 0 and any(p.requires_grad for p in loss.heads.parameters()):
        rates[r"(^|\.)heads\."] = recipe.binary.lr
    if "distill" in loss.terms and loss.terms["distill"].projection is not None:
        rates[r"\.projection\."] = recipe.distill.projection_lr
    return rates


def label_with_teacher(data: Dataset | DatasetDict, recipe: Recipe) -> Dataset | DatasetDict:
    """Add the cached teacher embeddings of every text column as the ``label`` column (no teacher forward
    pass during training); the cache is built once, by the main process first."""
    from trainer.train.teacher import add_teacher_labels

    def label(dataset: Dataset) -> Dataset:
        return add_teacher_labels(dataset, recipe.distill, text_columns(dataset), recipe.model.name)

    return DatasetDict({name: label(d) for name, d in data.items()}) if isinstance(data, DatasetDict) else label(data)


def train_heads_from_recipe(
    recipe: Recipe, model: SentenceTransformer, grid: Grid, data, resume: str | None = None
) -> None:
    """Head-only mode: the encoder stays frozen; its texts train the binarization heads (trainer.train.head_only).
    The output folder is a full checkpoint: the unchanged model, its heads and the manifest. Checkpoints
    follow the training arguments ``save_strategy`` and ``save_steps`` (a fraction of ``binary.steps`` when < 1)."""
    datasets = data.values() if isinstance(data, DatasetDict) else [data]
    texts, pairs = [], []
    for dataset in datasets:
        columns = text_columns(dataset)
        texts += [text for column in columns for text in dataset[column]]
        if columns[:2] == ["anchor", "positive"]:
            pairs += list(zip(dataset["anchor"], dataset["positive"], strict=True))
    log_summary(run_summary(recipe, grid, None, data, num_layers(model), embedding_dim(model)))
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(recipe.output_dir))
    save_steps = recipe.training.get("save_steps", 500)
    save_steps = save_steps if save_steps >= 1 else math.ceil(save_steps * recipe.binary.steps)
    if recipe.training.get("save_strategy", "steps") == "no":
        save_steps = None
    heads = train_heads_only(model, texts, pairs, grid, recipe.binary, recipe.output_dir, save_steps, resume)
    binary = recipe.binary
    loss = EmbeddingToEmbeddingLoss(heads, binary.bits, binary.scale, binary.kl_weight, binary.kl_temperature)
    write_manifest(recipe, grid, model, loss=loss)


def train_from_recipe(path: str, overrides: list[str] | None = None) -> SentenceTransformerTrainer:
    torch.set_float32_matmul_precision("high")
    return train(load_recipe(path, overrides))
