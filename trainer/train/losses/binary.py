"""Losses of the recurrent binarization heads: joint (with the encoder) and head-only, at every (cell, depth)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.binary.heads import HEADS_FOLDER, BinaryHeads, check_bits, depth_shares
from trainer.errors import UserError
from trainer.grid import Cell
from trainer.train.losses.elastic import CellBatch, group_mean
from trainer.train.losses.infonce import InfoNCELoss, score_kl


def trained_depths(heads: BinaryHeads, bits: Sequence[int]) -> tuple[int, ...]:
    """``bits`` as valid, increasing depths that ``heads`` were built for (UserError otherwise)."""
    depths = tuple(check_bits(bits))
    for depth in depths:
        heads.check_depth(depth)
    return depths


BEBR_CITATION = """@inproceedings{gan2023bebr,
  title     = {Binary Embedding-based Retrieval at Tencent},
  author    = {Gan, Yukang and Ge, Yixiao and Zhou, Chang and Su, Shupeng and Xu, Zhouchuan and Xu, Xuyuan
               and Hui, Quanchao and Chen, Xiang and Wang, Yexin and Shan, Ying},
  booktitle = {Proceedings of the 29th ACM SIGKDD Conference on Knowledge Discovery and Data Mining},
  year      = {2023}
}"""


class BinaryCodeLoss(nn.Module):
    """InfoNCE on the codes of every float cell at every depth, plus KL to the float cell's scores.

    For a cell c and a depth k, let ``q = normalize(e_k(anchor))`` and ``d = normalize(e_k(candidates))``
    be the float forms of the codes (``trainer.binary.heads``; their dot product is the code score of
    ``trainer.binary.codes.code_scores``), ``S_ck`` the InfoNCE scores of ``q`` against ``d``
    (``trainer.train.losses.infonce``) and ``S_c`` those of the float cell; over the step's n (cell, depth)
    pairs:

        L = weight * sum_k s_k mean_c InfoNCE(S_ck)
          + kl_weight * sum_k s_k mean_c KL(softmax(S_c / T) || softmax(S_ck / T))

    with ``S_c`` detached and ``s_k = w_k / sum_j w_j`` the share of depth k (``bit_weights``, equal by
    default: each group is then the plain mean over its (cell, depth) pairs). Each group is a weighted mean, so
    the share of the codes in the objective does not grow with the number of cells or depths. Gradients reach
    the heads and (scaled by ``binary.encoder_grad``, see ``ElasticLoss``) the encoder. BEBR (Gan et al., KDD
    2023) trains only its deepest code; training every configured depth is this project's extension, so that
    the shallow prefixes served at 1 or 2 bits are themselves optimised rather than by-products. Components
    are logged as ``bin/L4-D128-B2`` and ``binkl/L4-D128-B2``, already scaled by their group's
    ``weight * s_k / n_cells``.

    Distributed training: the heads are parameters of this loss, not of the DDP-wrapped model, so the
    caller all-reduces their gradients; BatchNorm running statistics stay per rank.
    """

    citation = BEBR_CITATION

    def __init__(
        self,
        heads: BinaryHeads,
        bits: Sequence[int],
        contrastive: InfoNCELoss,
        weight: float = 1.0,
        kl_weight: float = 1.0,
        kl_temperature: float = 1.0,
        bit_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.bits = trained_depths(heads, bits)
        self.shares = depth_shares(self.bits, bit_weights)
        self.heads = heads
        self.contrastive = contrastive
        self.weight = weight
        self.kl_weight = kl_weight
        self.kl_temperature = kl_temperature

    def forward(self, batch: CellBatch) -> dict[str, Tensor]:
        if len(batch.layer_embeddings) < 2:  # a label-free batch of one text column: nothing to contrast
            return {}
        contrastive = {depth: {} for depth in self.bits}
        kl = {depth: {} for depth in self.bits}
        for cell, columns in batch.embeddings.items():
            float_pool = self.contrastive.pool(columns[1:])[0] if self.kl_weight else None
            for depth in self.bits:
                codes = batch.codes[cell.with_bits(depth)]
                code_pool = self.contrastive.pool(codes[1:])
                name = str(cell.with_bits(depth))
                contrastive[depth][f"bin/{name}"] = self.contrastive(codes[0], codes[1:], code_pool)
                if float_pool is not None:
                    kl[depth][f"binkl/{name}"] = self.contrastive.kl(
                        columns[0], float_pool, codes[0], code_pool[0], self.kl_temperature
                    )
        components = {}
        for depth, share in self.shares.items():
            components.update(group_mean(contrastive[depth], self.weight * share))
            components.update(group_mean(kl[depth], self.kl_weight * share))
        return components

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "bits": list(self.bits),
            "hidden": self.heads.hidden,
            "sharing": self.heads.sharing,
            "scale": self.contrastive.scale,
            "weight": self.weight,
            "kl_weight": self.kl_weight,
            "kl_temperature": self.kl_temperature,
            "bit_shares": {depth: round(share, 6) for depth, share in self.shares.items()},
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the heads to ``<directory>/binary_heads`` (``BinaryHeads.save_pretrained``)."""
        self.heads.save(directory)

    def load_state(self, directory: str | Path) -> None:
        """Restore the heads from a checkpoint written by ``save_pretrained``."""
        saved = BinaryHeads.load(directory)
        if saved is None:
            raise UserError(f"{directory}: no {HEADS_FOLDER}/ to resume the binarization heads from")
        self.heads.load_state_dict(saved.state_dict())


class EmbeddingToEmbeddingLoss(nn.Module):
    """Head-only training with a frozen encoder: codes must retrieve float embeddings (BEBR's task-agnostic
    "embedding-to-embedding" training, Gan et al., KDD 2023), at every configured depth.

    For a cell c, depth k, the batch's unit float embeddings ``x_1..x_N`` and the normalised float forms of
    their codes ``z_i = normalize(e_k(x_i))``:

        L_self = CE(scale * z_i . x_j, target j = i)                          (each code finds its own item)
        L_pair = (CE(scale * z_{a_i} . x_{p_j}, i) + CE(scale * z_{p_i} . x_{a_j}, i)) / 2    (given pairs)
        L_kl   = KL(softmax(scale * x_i . x_j / T) || softmax(scale * z_i . z_j / T)), j != i

    L_kl makes code-to-code scores (what packed codes are ranked by) follow the float scores; weighted by
    ``kl_weight``. Components are logged as ``e2e/<cell>``, ``e2epair/<cell>``, ``e2ekl/<cell>``.
    """

    citation = BEBR_CITATION

    def __init__(
        self,
        heads: BinaryHeads,
        bits: Sequence[int],
        scale: float = 20.0,
        kl_weight: float = 1.0,
        kl_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.bits = trained_depths(heads, bits)
        self.heads = heads
        self.scale = scale
        self.kl_weight = kl_weight
        self.kl_temperature = kl_temperature

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "bits": list(self.bits),
            "hidden": self.heads.hidden,
            "sharing": self.heads.sharing,
            "scale": self.scale,
            "kl_weight": self.kl_weight,
            "kl_temperature": self.kl_temperature,
        }

    def _codes(self, x: Tensor, cell: Cell) -> list[Tensor]:
        forms = self.heads.encode_float(x, cell)
        return [F.normalize(forms[depth - 1], dim=-1) for depth in self.bits]

    def _retrieval(self, codes: Tensor, floats: Tensor) -> Tensor:
        labels = torch.arange(codes.shape[0], device=codes.device)
        return F.cross_entropy(self.scale * codes @ floats.T, labels)

    def _kl(self, floats: Tensor, codes: Tensor) -> Tensor:
        off_diagonal = ~torch.eye(floats.shape[0], dtype=torch.bool, device=floats.device)
        n = floats.shape[0]
        target = (self.scale * floats @ floats.T)[off_diagonal].view(n, n - 1)
        scores = (self.scale * codes @ codes.T)[off_diagonal].view(n, n - 1)
        return score_kl(target, scores, self.kl_temperature)

    def forward(
        self, items: dict[Cell, Tensor], pairs: dict[Cell, tuple[Tensor, Tensor]] | None = None
    ) -> dict[str, Tensor]:
        """``items[cell]``: unit (N, cell.dim) float embeddings; ``pairs[cell]``: (anchors, positives)."""
        losses: dict[str, Tensor] = {}
        for cell, floats in items.items():
            for depth, codes in zip(self.bits, self._codes(floats, cell), strict=True):
                name = str(cell.with_bits(depth))
                losses[f"e2e/{name}"] = self._retrieval(codes, floats)
                if self.kl_weight:
                    losses[f"e2ekl/{name}"] = self.kl_weight * self._kl(floats, codes)
        for cell, (anchors, positives) in (pairs or {}).items():
            anchor_codes, positive_codes = self._codes(anchors, cell), self._codes(positives, cell)
            for depth, a, p in zip(self.bits, anchor_codes, positive_codes, strict=True):
                pair_loss = (self._retrieval(a, positives) + self._retrieval(p, anchors)) / 2
                losses[f"e2epair/{cell.with_bits(depth)}"] = pair_loss
        return losses
