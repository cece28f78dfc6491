"""InfoNCE with in-batch and hard negatives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

BLOCK_ROWS = 256


def blockwise_sum(
    block_loss: Callable[..., Tensor], rows: Sequence[Tensor], shared: Sequence[Tensor], block_rows: int = BLOCK_ROWS
) -> Tensor:
    """``sum_b block_loss(*(r[b] for r in rows), *shared)`` over blocks ``b`` of ``block_rows`` rows: a loss that
    is a sum over the rows of a score matrix (anchors x candidates), computed block by block.

    Each block is an activation checkpoint (``torch.utils.checkpoint``): the backward pass recomputes the
    block's scores instead of keeping them, so a term's autograd graph holds only its inputs and the largest
    transient is ``block_rows x M`` scores, not ``N x M`` for every term and cell of the step. This is what
    lets gradient caching (``ElasticLoss.mini_batch_size``) run the whole grid's terms on a large batch in
    bounded memory. Values and gradients are those of the unblocked sum, up to float summation order; the
    price is one more matrix product per block in the backward pass.
    """
    total = None
    for start in range(0, rows[0].shape[0], block_rows):
        inputs = [r[start : start + block_rows] for r in rows] + list(shared)
        part = checkpoint(block_loss, *inputs, use_reentrant=False) if torch.is_grad_enabled() else block_loss(*inputs)
        total = part if total is None else total + part
    return total


def _cross_entropy_sum(anchors: Tensor, labels: Tensor, pool: Tensor, scale: float) -> Tensor:
    return F.cross_entropy(scale * anchors @ pool.T, labels, reduction="sum")


def _kl_sum(
    target_anchors: Tensor, anchors: Tensor, target_pool: Tensor, pool: Tensor, scale: float, temperature: float
) -> Tensor:
    target = F.softmax(scale * target_anchors @ target_pool.T / temperature, dim=-1)
    return F.kl_div(F.log_softmax(scale * anchors @ pool.T / temperature, dim=-1), target, reduction="sum")


def gather_rows(tensor: Tensor) -> tuple[Tensor, int]:
    """The rows of ``tensor`` from every process, in rank order (gradients flow back to each process's own
    rows, ``sentence_transformers.util.all_gather_with_grad``), and the offset of this process's rows in
    them. Processes may hold different numbers of rows (e.g. a last, shorter batch): those are padded for
    the gather and the padding dropped. Without torch.distributed: ``(tensor, 0)``."""
    if get_world_size() == 1:
        return tensor, 0
    sizes = all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    rank, longest = get_rank(), max(sizes)
    if min(sizes) == longest:
        return all_gather_with_grad(tensor.contiguous()), rank * longest
    padding = tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])
    gathered = all_gather_with_grad(torch.cat([tensor, padding]).contiguous())
    rows = torch.cat([torch.arange(r * longest, r * longest + n, device=tensor.device) for r, n in enumerate(sizes)])
    return gathered[rows], sum(sizes[:rank])


def score_kl(target_scores: Tensor, scores: Tensor, temperature: float = 1.0) -> Tensor:
    """Row-wise ``KL(softmax(target / T) || softmax(scores / T))``, averaged over rows; the target is detached,
    so only ``scores`` learn to rank candidates like ``target_scores``."""
    target = F.softmax(target_scores.detach() / temperature, dim=-1)
    return F.kl_div(F.log_softmax(scores / temperature, dim=-1), target, reduction="batchmean")


class InfoNCELoss(nn.Module):
    """InfoNCE over in-batch negatives plus hard negatives (van den Oord et al. 2018; Karpukhin et al. 2020).

    For unit anchors ``a_i``, positives ``p_i`` and hard negatives ``n_{i,k}``, the candidates are
    ``C = [p_1..p_N, n_{1,1}..n_{N,K}]`` (from every process when ``gather_across_devices``) and

        s_ij = scale * a_i . c_j            (scale = 1 / temperature)
        L = -1/N sum_i log( exp(s_{i,pos(i)}) / sum_j exp(s_ij) )

    With ``symmetric``, the loss is the mean of that and the same term from positives to anchors
    (``-log exp(s_ii) / sum_j exp(p_i . a_j * scale)``), as in CLIP. Duplicate-free batches come from the
    ``batch_sampler: no_duplicates`` training argument, as in sentence-transformers. Both this loss and
    ``kl`` are computed over blocks of anchors (``blockwise_sum``), so no N x M score matrix is kept for the
    backward pass.
    """

    def __init__(self, scale: float = 20.0, symmetric: bool = False, gather_across_devices: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices

    def _gather(self, tensor: Tensor) -> tuple[Tensor, int]:
        return gather_rows(tensor) if self.gather_across_devices else (tensor, 0)

    def scores(self, anchors: Tensor, candidates: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Scaled scores (N, M) of anchors against every candidate, and the column of each positive."""
        pool, offset = self.pool(candidates)
        labels = torch.arange(anchors.shape[0], device=anchors.device) + offset
        return self.scale * anchors @ pool.T, labels

    def pool(self, candidates: list[Tensor]) -> tuple[Tensor, int]:
        """Every candidate (M, dim) in one matrix, from every process when gathering, and the column of the
        first anchor's positive."""
        gathered = [self._gather(c) for c in candidates]
        return torch.cat([g for g, _ in gathered], dim=0), gathered[0][1]

    def cross_entropy(self, anchors: Tensor, pool: tuple[Tensor, int]) -> Tensor:
        """``-1/N sum_i log softmax(s_i)[pos(i)]`` against a ``pool`` from ``pool()``, one direction of the loss."""
        candidates, offset = pool
        labels = torch.arange(anchors.shape[0], device=anchors.device) + offset
        block = partial(_cross_entropy_sum, scale=self.scale)
        return blockwise_sum(block, [anchors, labels], [candidates]) / len(anchors)

    def forward(self, anchors: Tensor, candidates: list[Tensor], pool: tuple[Tensor, int] | None = None) -> Tensor:
        """The loss; ``candidates[0]`` are the positives, the rest hard negatives. ``pool``: ``pool(candidates)``
        when the caller already gathered it (to share it with ``kl``)."""
        loss = self.cross_entropy(anchors, pool if pool is not None else self.pool(candidates))
        if self.symmetric:
            loss = (loss + self.cross_entropy(candidates[0], self.pool([anchors]))) / 2
        return loss

    def kl(
        self, target_anchors: Tensor, target_pool: Tensor, anchors: Tensor, pool: Tensor, temperature: float = 1.0
    ) -> Tensor:
        """``score_kl`` of the scores of ``anchors`` against ``pool`` to those of the (detached) target vectors,
        ``1/N sum_i KL(softmax(S_target,i / T) || softmax(S_i / T))``, without materialising either N x M
        matrix for the backward pass. The pools are ``pool()``'s matrices, gathered once by the caller."""
        block = partial(_kl_sum, scale=self.scale, temperature=temperature)
        return blockwise_sum(block, [target_anchors.detach(), anchors], [target_pool.detach(), pool]) / len(anchors)
