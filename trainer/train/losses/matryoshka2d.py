"""2D Matryoshka losses over (layer, dim) cells: Starbucks (fixed cells) and 2DMSE (sampled cells)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn

from trainer.grid import Cell, Grid
from trainer.train.losses.infonce import InfoNCELoss, score_kl

if TYPE_CHECKING:
    from trainer.train.losses.elastic import CellBatch

Mode = Literal["starbucks", "2dmse", "grid"]


class CellSelection:
    """Which float cells one training step uses; the full cell (every layer, every dim) is always in.

    - ``starbucks`` and ``grid``: every cell of the grid, every step (Zhuang et al. 2024, "Starbucks:
      Improved Training for 2D Matryoshka Embeddings"; ``grid`` is simply every layer x every dim).
    - ``2dmse``: the last layer plus ``n_layers_per_step`` sampled earlier layers, crossed with the full
      dim plus ``n_dims_per_step`` sampled dims (Li et al. 2024, "2D Matryoshka Sentence Embeddings").
      The generator is seeded identically on every process, so all ranks train the same cells.
    """

    def __init__(
        self,
        grid: Grid,
        full: Cell,
        mode: Mode = "starbucks",
        n_layers_per_step: int = 1,
        n_dims_per_step: int = 1,
        seed: int = 42,
    ) -> None:
        self.grid, self.full, self.mode = grid, full, mode
        self.n_layers_per_step, self.n_dims_per_step = n_layers_per_step, n_dims_per_step
        self._random = random.Random(seed)

    def cells_for_step(self) -> list[Cell]:
        if self.mode != "2dmse":
            return sorted(set(self.grid.cells) | {self.full})
        prior_layers = [layer for layer in self.grid.layers if layer < self.full.layers]
        smaller_dims = [dim for dim in self.grid.dims if dim < self.full.dim]
        layers = [self.full.layers] + self._random.sample(prior_layers, min(self.n_layers_per_step, len(prior_layers)))
        dims = [self.full.dim] + self._random.sample(smaller_dims, min(self.n_dims_per_step, len(smaller_dims)))
        return sorted(Cell(layer, dim) for layer in layers for dim in dims)


class Matryoshka2dLoss(nn.Module):
    """Contrastive loss at every cell of the step plus KL alignment of each cell to the full model.

    For each cell c with scaled scores ``S_c`` (anchors x candidates, see ``InfoNCELoss``):

        L = weight * sum_c w_c * InfoNCE(S_c) + kl_weight * sum_{c != full} KL(P_full || P_c)
        P_c = softmax(S_c / T) row-wise,   P_full = softmax(S_full / T) with S_full detached

    over the same candidates (Zhuang et al. 2024, Starbucks; Li et al. 2024, 2DMSE, which aligns the
    sampled layer to the last one the same way). ``w_c`` is ``weights.get(c, 1.0)``. A batch with a
    single text column (label-free data) has no candidates and gets no term from this loss.
    """

    def __init__(
        self,
        contrastive: InfoNCELoss,
        weights: dict[Cell, float] | None = None,
        kl_weight: float = 1.0,
        kl_temperature: float = 1.0,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.contrastive = contrastive
        self.weight = weight
        self.weights = weights or {}
        self.kl_weight = kl_weight
        self.kl_temperature = kl_temperature

    def forward(self, batch: CellBatch) -> dict[str, Tensor]:
        losses, scores = {}, {}
        if len(batch.layer_embeddings) < 2:  # a label-free batch of one text column: nothing to contrast
            return losses
        for cell, columns in batch.embeddings.items():
            loss, scores[cell] = self.contrastive(columns[0], columns[1:])
            losses[f"loss/{cell.name2d}"] = self.weight * self.weights.get(cell, 1.0) * loss
        if self.kl_weight:
            for cell in batch.embeddings:
                if cell != batch.full:
                    kl = score_kl(scores[batch.full], scores[cell], self.kl_temperature)
                    losses[f"kl/{cell.name2d}"] = self.kl_weight * kl
        return losses
