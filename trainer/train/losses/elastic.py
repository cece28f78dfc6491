"""The loss the Trainer calls: one forward pass per input column, every term sees every selected cell."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import (
    RandContext,
    _backward_hook,
    _create_minibatch,
    _get_batch_size,
    _minibatch_ranges,
)
from torch import Tensor, nn

from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_vector, layer_embeddings
from trainer.grid import Cell, CellSelection


@dataclass
class CellBatch:
    """What a loss term sees for one step.

    ``embeddings[cell][c]`` is the unit-normalised (N, cell.dim) embedding of input column ``c``
    (0 = anchor, 1 = positive, 2.. = hard negatives) at a float cell; ``layer_embeddings[c][layer]`` the
    pooled full-width embedding the cells were cut from; ``labels`` is the dataset's label column, if any.
    With binarization heads, ``codes[cell.with_bits(k)][c]`` is the unit-normalised float form of the
    k-bit code of the same embedding (differentiable through the straight-through sign).
    """

    embeddings: dict[Cell, list[Tensor]]
    layer_embeddings: list[dict[int, Tensor]]
    full: Cell
    labels: Tensor | None
    codes: dict[Cell, list[Tensor]] = field(default_factory=dict)


def group_mean(components: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """Each component scaled by ``weight / len(components)``: the group adds ``weight * mean`` to the objective."""
    return {name: weight * value / len(components) for name, value in components.items()} if components else {}


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    if factor == 1.0:
        return x
    detached = x.detach()
    return detached if factor == 0.0 else detached + factor * (x - detached)


@dataclass
class MiniBatchEmbedder:
    """Pooled embeddings of a step's layer exits for mini-batches of one input column: the ``embed_minibatch_iter``
    that sentence-transformers' GradCache backward hook replays (``sentence_transformers.base.losses.gradcache``).
    Each item is ``(embeddings (n, len(layers), dim), random state)``; ``model`` is what the Trainer calls (the
    DDP-wrapped model in distributed training, so that the hook can defer gradient synchronisation)."""

    model: nn.Module
    layers: list[int]

    def embed_minibatch_iter(
        self,
        sentence_feature: dict[str, Tensor],
        with_grad: bool,
        copy_random_state: bool,
        random_states: list[RandContext] | None = None,
        ranges: list[tuple[int, int]] | None = None,
    ) -> Iterator[tuple[Tensor, RandContext | None]]:
        base = extract_model_from_parallel(self.model)
        for index, (begin, end) in enumerate(ranges):
            features = _create_minibatch(sentence_feature, begin, end)
            replay = nullcontext() if random_states is None else random_states[index]
            with replay, nullcontext() if with_grad else torch.no_grad():
                state = RandContext(*features.values()) if copy_random_state else None
                per_layer = layer_embeddings(base, features, self.layers, forward=self.model)
            yield torch.stack([per_layer[layer] for layer in self.layers], dim=1), state


class ElasticLoss(nn.Module):
    """Sum of loss terms over the cells of a step, all from ONE forward pass of the model per input column.

    The transformer runs once per column; each cell's vector comes from ``trainer.cell_vectors`` (the one
    definition shared with evaluation and serving). With ``heads``, each cell's codes at ``bits`` are
    computed once here and shared by the terms; ``code_encoder_grad`` scales the gradient the codes send into
    the encoder (0: codes never move the encoder, 1: as much as the float cells). Each term returns a dict of
    named, already weighted components (``loss/L4-D128``, ``kl/L4-D128``, ...); the Trainer sums them and
    logs each name.

    ``mini_batch_size``: gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
    Memory Limited Setup"), so that the batch size no longer bounds memory. A batch larger than
    ``mini_batch_size`` is (1) embedded mini-batch by mini-batch without gradients, every layer the step needs
    in the same pass, keeping each mini-batch's random state; (2) every term runs on the whole batch's cells
    (float cells, KL, codes at every depth, distillation), whose gradients w.r.t. the layer embeddings and the
    loss's own parameters (heads, projection) are cached; the terms score over blocks of rows and the heads
    are recomputed in the backward pass (``trainer.train.losses.infonce.blockwise_sum``,
    ``BinaryHeads.code_forms``), so this step keeps no batch x batch matrix and no head activations;
    (3) in the backward pass each mini-batch is
    embedded again with gradients under its saved random state (same dropout masks) and the cached
    gradients are back-propagated through it (sentence-transformers' GradCache hook, as in
    ``CachedMultipleNegativesRankingLoss``: DDP synchronises once, after the last mini-batch). The cell
    selection samples once per step. Gradients equal those of the uncached loss, up to the different dropout
    masks of mini-batches (equal without dropout).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        selection: CellSelection,
        terms: dict[str, nn.Module],
        heads: BinaryHeads | None = None,
        bits: tuple[int, ...] = (),
        code_encoder_grad: float = 1.0,
        mini_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("ElasticLoss needs at least one term")
        self.model = model
        self.selection = selection
        self.terms = nn.ModuleDict(terms)
        self.heads = heads
        self.bits = tuple(bits)
        self.code_encoder_grad = code_encoder_grad
        self.mini_batch_size = mini_batch_size

    def forward(self, sentence_features: list[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        cells = self.selection.cells_for_step()
        layers = sorted({cell.layers for cell in cells})
        batch_size = max(_get_batch_size(features) for features in sentence_features)
        if self.mini_batch_size is not None and batch_size > self.mini_batch_size:
            return self.cached_forward(sentence_features, labels, cells, layers)
        base = extract_model_from_parallel(self.model)
        per_column = [layer_embeddings(base, features, layers, forward=self.model) for features in sentence_features]
        return self.terms_loss(per_column, cells, labels)

    def cached_forward(
        self, sentence_features: list[dict[str, Tensor]], labels: Tensor | None, cells: list[Cell], layers: list[int]
    ) -> dict[str, Tensor]:
        """Steps (1)-(2) of gradient caching (class docstring); the returned components carry step (3)."""
        embedder = MiniBatchEmbedder(self.model, layers)
        grad_enabled = torch.is_grad_enabled()
        ranges = [_minibatch_ranges(features, self.mini_batch_size) for features in sentence_features]
        cached: list[list[Tensor]] = []
        random_states: list[list[RandContext | None]] = []
        for features, column_ranges in zip(sentence_features, ranges, strict=True):
            parts = list(embedder.embed_minibatch_iter(features, False, grad_enabled, ranges=column_ranges))
            cached.append([part.detach().requires_grad_(grad_enabled) for part, _ in parts])
            random_states.append([state for _, state in parts])
        per_column = []
        for parts in cached:
            column = torch.cat(parts)  # (batch, len(layers), dim)
            per_column.append({layer: column[:, i] for i, layer in enumerate(layers)})
        losses = self.terms_loss(per_column, cells, labels)
        if not grad_enabled:
            return losses
        leaves = [part for parts in cached for part in parts]
        own = self.own_parameters()
        total = torch.stack(list(losses.values())).sum()
        grads = iter(torch.autograd.grad(total, leaves + own, materialize_grads=True))
        cache = [[next(grads) for _ in parts] for parts in cached]
        # One zero-valued tensor carries the rest of the backward pass: its hook replays the mini-batches
        # (step 3), and it hands the cached gradients to the heads and projection; both are scaled by what the
        # Trainer back-propagates (gradient accumulation, loss scaling).
        replay = torch.zeros((), dtype=total.dtype, device=total.device, requires_grad=True)
        replay.register_hook(
            partial(
                _backward_hook,
                sentence_features=sentence_features,
                loss_obj=embedder,
                cache=cache,
                random_states=random_states,
                ranges=ranges,
            )
        )
        carrier = replay + sum((parameter * next(grads)).sum() for parameter in own)
        losses = {name: value.detach() for name, value in losses.items()}
        first = next(iter(losses))
        losses[first] = losses[first] + (carrier - carrier.detach())
        return losses

    def own_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the loss itself (binarization heads, distillation projection)."""
        model_parameters = {id(p) for p in self.model.parameters()}
        return [p for p in self.parameters() if id(p) not in model_parameters and p.requires_grad]

    def terms_loss(self, per_column: list[dict[int, Tensor]], cells: list[Cell], labels: Tensor | None):
        """Every term on the cells of ``per_column`` (each column's pooled embedding per layer exit)."""
        embeddings = {cell: [cell_vector(column, cell) for column in per_column] for cell in cells}
        codes = {}
        if self.heads is not None:
            inputs = {c: [scale_gradient(x, self.code_encoder_grad) for x in xs] for c, xs in embeddings.items()}
            codes = self.heads.code_forms(inputs, self.bits)
        batch = CellBatch(embeddings, per_column, self.selection.full, labels, codes)
        losses: dict[str, Tensor] = {}
        for term in self.terms.values():
            losses.update(term(batch))
        if not losses:
            raise ValueError(
                f"no loss term applies to a batch of {len(per_column)} column(s); label-free text needs a "
                "distill section"
            )
        return losses

    @property
    def citation(self) -> str:
        """The BibTeX of every term, for the model card (sentence-transformers reads ``loss.citation``)."""
        return "\n".join(term.citation for term in self.terms.values() if getattr(term, "citation", None))

    def get_config_dict(self) -> dict[str, Any]:
        """Every term's settings, for the model card (sentence-transformers reads ``loss.get_config_dict()``)."""
        selection = self.selection
        config: dict[str, Any] = {
            "mode": selection.mode,
            "last_layer_cells": [c.name2d for c in selection.last_layer],
            "earlier_cells": [c.name2d for c in selection.grid.cells if c.layers < selection.full.layers],
        }
        if self.heads is not None:
            config["bits"] = list(self.bits)
            config["code_encoder_grad"] = self.code_encoder_grad
        if self.mini_batch_size is not None:
            config["mini_batch_size"] = self.mini_batch_size
        for name, term in self.terms.items():
            config[name] = term.get_config_dict()
        return config
