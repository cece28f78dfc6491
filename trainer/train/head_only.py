"""Head-only training: learn binary heads on a frozen encoder's cached float embeddings.

BEBR's task-agnostic "embedding-to-embedding" training (Gan et al., KDD 2023): the encoder is never
updated, so every layer embedding of every raw text is computed once (one pass per text, all layers, see
``trainer.cell_vectors.encode_layers``), cached on disk, and only the heads learn from it
(``trainer.train.losses.binary.EmbeddingToEmbeddingLoss``). Works on any sentence-transformers model, including
ones this project did not train, e.g. ``sentence-transformers/all-MiniLM-L6-v2`` as is. Like the HF Trainer,
it writes ``checkpoint-<step>`` folders and resumes from them (``--resume_from_checkpoint true``).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor

from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import LayerEncoder, cell_vector, embedding_dim, layer_name, num_layers, transformer_config
from trainer.errors import UserError
from trainer.grid import Cell, Grid
from trainer.store import build_store, text_key
from trainer.train.holdout import TOP_K, guard_heads, split_items, split_pairs
from trainer.train.losses.binary import EmbeddingToEmbeddingLoss
from trainer.train.recipe import BinaryConfig

logger = logging.getLogger(__name__)

CACHE_FOLDER = "binary_heads_cache"
CHECKPOINT_STATE = "head_only_state.pt"


def cached_layer_embeddings(
    model: SentenceTransformer, texts: list[str], layers: tuple[int, ...], cache_dir: Path, batch_size: int = 64
) -> dict[int, Tensor]:
    """Float32 embeddings of every layer for ``texts`` (row i = texts[i]), from a store (``trainer.store``) in
    ``cache_dir`` keyed by (model, max length, texts), built once."""
    unique = list(dict.fromkeys(texts))
    key = text_key([transformer_config(model).name_or_path, model.max_seq_length], unique)
    store = build_store(
        Path(cache_dir) / f"layers-{key[:24]}",
        key,
        unique,
        [layer_name(layer) for layer in layers],
        LayerEncoder(model, tuple(layers), batch_size),
        label="binary heads cache",
    )
    row = {text: i for i, text in enumerate(unique)}
    index = np.array([row[text] for text in texts])
    return {layer: torch.from_numpy(store.take(layer_name(layer), index)) for layer in layers}


def _check(model: SentenceTransformer, grid: Grid, config: BinaryConfig) -> None:
    if config.mode != "head-only":
        raise UserError(f"binary.mode: {config.mode!r}; head-only training needs binary.mode: head-only")
    if grid.code_bits and tuple(grid.code_bits) != tuple(config.bits):
        raise UserError(
            f"binary.bits: {config.bits} differ from the grid's code bits {list(grid.code_bits)}; make them equal"
        )
    config.check_dims(grid.dims)
    try:
        grid.check_fits(num_layers(model), embedding_dim(model))
    except ValueError as error:
        raise UserError(str(error)) from error


def train_heads_only(
    model: SentenceTransformer,
    texts: list[str],
    pairs: list[tuple[str, str]] | None,
    grid: Grid,
    config: BinaryConfig,
    output_dir: str | Path,
    save_steps: int | None = None,
    resume_from: str | Path | None = None,
) -> BinaryHeads:
    """Train binary heads for every cell of ``grid`` on the frozen ``model``; save them under ``output_dir``.

    ``texts``: raw texts (e.g. a corpus); ``pairs``: optional (query, positive) texts, whose members are also
    items. Each step samples ``batch_size`` items (and as many pairs) and applies the embedding-to-embedding
    loss at every cell and depth; returns the trained heads in eval mode. ``save_steps`` and ``resume_from``:
    checkpoints, see ``fit_heads``.
    """
    _check(model, grid, config)
    pairs = list(pairs or [])
    unique = list(dict.fromkeys([*texts, *(text for pair in pairs for text in pair)]))
    generator = random.Random(config.seed)
    if config.max_texts is not None and len(unique) > config.max_texts:
        unique = generator.sample(unique, config.max_texts)
    if len(unique) < 2:
        raise UserError(f"binary head-only training needs at least 2 distinct texts, got {len(unique)}")
    index = {text: i for i, text in enumerate(unique)}
    pair_index = torch.tensor([(index[a], index[p]) for a, p in pairs if a in index and p in index], dtype=torch.long)

    cache_dir = Path(config.cache_dir) if config.cache_dir else Path(output_dir) / CACHE_FOLDER
    layers = cached_layer_embeddings(model, unique, grid.layers, cache_dir)
    heads = fit_heads(layers, grid, config, pair_index, output_dir, save_steps, resume_from)
    heads.save(output_dir)
    return heads


def fit_heads(
    layer_embeddings: dict[int, Tensor],
    grid: Grid,
    config: BinaryConfig,
    pairs: Tensor | None = None,
    output_dir: str | Path | None = None,
    save_steps: int | None = None,
    resume_from: str | Path | None = None,
) -> BinaryHeads:
    """Train new heads on cached float embeddings; returns them in eval mode.

    ``layer_embeddings[layer]``: (N, width) pooled embeddings of N items for every layer of ``grid``;
    ``pairs``: optional (P, 2) row indices of (anchor, positive) items. Each step samples ``batch_size``
    items (and as many pairs) and applies the embedding-to-embedding loss at every cell and depth, with
    AdamW and a cosine learning-rate decay over ``steps``.

    With ``output_dir`` and ``save_steps``, every ``save_steps`` steps write ``<output_dir>/checkpoint-<step>``
    (the heads, and the optimizer, schedule, random state and step, as HF Trainer checkpoints hold);
    ``resume_from`` such a checkpoint ends with the heads an uninterrupted run ends with.

    ``config.holdout``: the share of the pairs' anchors (or, without pairs, of the items) kept out of training;
    after training, each head that ranks them worse than the parameter-free quantiser is reset to it
    (``trainer.train.holdout``).
    """
    count = len(next(iter(layer_embeddings.values())))
    pairs = pairs if pairs is not None else torch.empty(0, 2, dtype=torch.long)
    split = torch.Generator().manual_seed(config.seed)
    items, held_pairs, held_items = torch.arange(count), None, None
    if config.holdout and len(pairs) >= 2:
        pairs, held_pairs = split_pairs(pairs, config.holdout, split)
    elif config.holdout:
        items, held_items = split_items(count, config.holdout, split)
    torch.manual_seed(config.seed)
    heads = BinaryHeads(grid.dims, config.bits, config.hidden, config.sharing, grid.layers)
    loss_fn = EmbeddingToEmbeddingLoss(heads, config.bits, config.scale, config.kl_weight, config.kl_temperature)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    start = load_checkpoint(resume_from, heads, optimizer, schedule) if resume_from is not None else 0
    batch_size = min(config.batch_size, len(items))
    heads.train()
    for step in range(start, config.steps):
        batch = items[torch.randperm(len(items))[:batch_size]]
        losses = loss_fn(_cells(layer_embeddings, batch, grid), _pair_cells(layer_embeddings, pairs, batch_size, grid))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("binary heads step %d/%d: loss %.4f", step + 1, config.steps, total.item())
        if output_dir is not None and save_steps and (step + 1) % save_steps == 0:
            save_checkpoint(Path(output_dir) / f"checkpoint-{step + 1}", heads, optimizer, schedule, step + 1)
    heads.eval()
    if (held_pairs is not None and len(held_pairs)) or (held_items is not None and len(held_items) > 2 * TOP_K):
        guard_heads(heads, layer_embeddings, grid, held_pairs, held_items, config.seed)
    elif config.holdout:
        logger.warning("binary heads: too little data to hold out %s of it; the heads are not checked", config.holdout)
    return heads


def save_atomically(state: object, path: Path) -> None:
    """``torch.save`` to a temporary file renamed into place: a killed run never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def save_checkpoint(folder: Path, heads: BinaryHeads, optimizer, schedule, step: int) -> None:
    """The heads, then the training state; the training state is written last, so its presence marks a
    complete checkpoint."""
    heads.save(folder)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
    }
    save_atomically(state, folder / CHECKPOINT_STATE)


def load_checkpoint(folder: str | Path, heads: BinaryHeads, optimizer, schedule) -> int:
    """Restore a checkpoint written by ``save_checkpoint`` into ``heads``, ``optimizer`` and ``schedule`` and the
    random state; returns its step."""
    path = Path(folder) / CHECKPOINT_STATE
    saved = BinaryHeads.load(folder)
    if saved is None or not path.is_file():
        raise UserError(f"{folder}: not a complete head-only checkpoint (it needs binary_heads/ and {path.name})")
    try:
        heads.load_state_dict(saved.state_dict())
    except RuntimeError:
        raise UserError(f"{folder}: its heads differ from the recipe's binary section (dims, bits or hidden)") from None
    state = torch.load(path, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    logger.info("binary heads: resumed from %s at step %d", folder, state["step"])
    return state["step"]


def _cells(layers: dict[int, Tensor], rows: Tensor, grid: Grid) -> dict[Cell, Tensor]:
    selected = {layer: embeddings[rows] for layer, embeddings in layers.items()}
    return {cell: cell_vector(selected, cell) for cell in grid.cells}


def _pair_cells(
    layers: dict[int, Tensor], pair_index: Tensor, batch_size: int, grid: Grid
) -> dict[Cell, tuple[Tensor, Tensor]] | None:
    if len(pair_index) < 2:
        return None
    chosen = pair_index[torch.randperm(len(pair_index))[:batch_size]]
    anchors, positives = _cells(layers, chosen[:, 0], grid), _cells(layers, chosen[:, 1], grid)
    return {cell: (anchors[cell], positives[cell]) for cell in grid.cells}
