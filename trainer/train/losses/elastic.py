"""The loss the Trainer calls: one forward pass per input column, every term sees every selected cell."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from accelerate.utils import extract_model_from_parallel
from sentence_transformers import SentenceTransformer
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


class ElasticLoss(nn.Module):
    """Sum of loss terms over the cells of a step, all from ONE forward pass of the model per input column.

    The transformer runs once per column; each cell's vector comes from ``trainer.cell_vectors`` (the one
    definition shared with evaluation and serving). With ``heads``, each cell's codes at ``bits`` are
    computed once here and shared by the terms; ``code_encoder_grad`` scales the gradient the codes send into
    the encoder (0: codes never move the encoder, 1: as much as the float cells). Each term returns a dict of
    named, already weighted components (``loss/L4-D128``, ``kl/L4-D128``, ...); the Trainer sums them and
    logs each name.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        selection: CellSelection,
        terms: dict[str, nn.Module],
        heads: BinaryHeads | None = None,
        bits: tuple[int, ...] = (),
        code_encoder_grad: float = 1.0,
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

    def forward(self, sentence_features: list[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        base = extract_model_from_parallel(self.model)
        cells = self.selection.cells_for_step()
        layers = {cell.layers for cell in cells}
        per_column = [layer_embeddings(base, features, layers, forward=self.model) for features in sentence_features]
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
                f"no loss term applies to a batch of {len(sentence_features)} column(s); label-free text needs a "
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
        for name, term in self.terms.items():
            config[name] = term.get_config_dict()
        return config
