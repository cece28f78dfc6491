"""The short summary a training run prints before it starts: what will run, on what, and where it goes."""

from __future__ import annotations

import logging

from datasets import Dataset, DatasetDict

from trainer.grid import Grid
from trainer.train.losses import ElasticLoss
from trainer.train.recipe import Recipe

logger = logging.getLogger("trainer")


def _rows(data: Dataset | DatasetDict) -> str:
    if isinstance(data, DatasetDict):
        return (
            ", ".join(f"{name} {len(part):,}" for name, part in data.items())
            + f" (total {sum(map(len, data.values())):,})"
        )
    return f"{len(data):,}"


def run_summary(
    recipe: Recipe, grid: Grid, loss: ElasticLoss | None, data: Dataset | DatasetDict, layers: int, dim: int
) -> str:
    """One short block: model, grid, cells and weights, bit depths, teacher, data rows, steps, batch, output."""
    training = recipe.training
    tokens = recipe.model.max_seq_length or "the model's"
    lines = [f"model: {recipe.model.name} ({layers} layers x {dim} dims, at most {tokens} tokens per text)"]
    if loss is not None:
        config = recipe.loss
        selection = loss.selection
        earlier = [c.name2d for c in grid.cells if c.layers < selection.full.layers]
        lines.append(
            f"cells ({config.type}): last layer {', '.join(c.name2d for c in selection.last_layer)}; "
            f"earlier {', '.join(earlier) or 'none'}"
        )
        lines.append(
            f"weights: full {config.full_weight}, last-layer dims {config.dims_weight}, earlier cells "
            f"{config.layers_weight}, KL {config.kl_weight}{'' if config.kl_last_layer else ' (earlier layers only)'} "
            f"(x contrastive {config.contrastive_weight})"
        )
    if recipe.binary is not None:
        binary = recipe.binary
        lines.append(
            f"codes: {binary.bits} bits per dim, {binary.mode}, heads lr {binary.lr}, weight {binary.weight}, "
            f"KL {binary.kl_weight}, scale {binary.scale}, encoder_grad {binary.encoder_grad}"
            + (f", bit weights {binary.bit_weights}" if binary.bit_weights is not None else "")
        )
    if recipe.distill is not None:
        distill = recipe.distill
        lines.append(
            f"teacher: {distill.teacher} (cosine {distill.cosine_weight}, similarity {distill.similarity_weight}, "
            f"relative {distill.relative_weight})"
            + (f", layers {distill.layers}" if distill.layers is not None else "")
        )
    lines.append(f"data: {_rows(data)} rows")
    steps = training.get("max_steps") or f"{training.get('num_train_epochs', 3)} epoch(s)"
    lines.append(
        f"steps: {steps}, batch {training.get('per_device_train_batch_size', 8)} per device, "
        f"lr {training.get('learning_rate', 5e-5)}; output: {recipe.output_dir}"
    )
    return "\n".join(lines)


def log_summary(text: str) -> None:
    for line in text.splitlines():
        logger.info(line)
