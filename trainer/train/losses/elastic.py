"""The loss the Trainer calls: one forward pass per input column, every term sees every selected cell."""

from __future__ import annotations

from dataclasses import dataclass, field

from accelerate.utils import extract_model_from_parallel
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_embedding, embed_layers
from trainer.grid import Cell
from trainer.train.losses.matryoshka2d import CellSelection


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


class ElasticLoss(nn.Module):
    """Sum of loss terms over the cells of a step, all from ONE forward pass of the model per input column.

    The transformer runs once per column with ``output_hidden_states``; each layer is pooled with the
    model's own pooling and each dim is a re-normalised prefix (see ``trainer.cell_vectors``). With ``heads``,
    each cell's codes at ``bits`` are computed once here and shared by the terms. Each term returns a dict
    of named, already weighted components (``loss/L4-D128``, ``kl/L4-D128``, ...); the Trainer sums them
    and logs each name.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        selection: CellSelection,
        terms: dict[str, nn.Module],
        heads: BinaryHeads | None = None,
        bits: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("ElasticLoss needs at least one term")
        self.model = model
        self.selection = selection
        self.terms = nn.ModuleDict(terms)
        self.heads = heads
        self.bits = tuple(bits)

    def forward(self, sentence_features: list[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        base = extract_model_from_parallel(self.model)
        cells = self.selection.cells_for_step()
        layers = {cell.layers for cell in cells}
        per_column = [embed_layers(base, features, layers, forward=self.model) for features in sentence_features]
        embeddings = {cell: [cell_embedding(column, cell) for column in per_column] for cell in cells}
        codes = self.heads.code_forms(embeddings, self.bits) if self.heads is not None else {}
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
