"""InfoNCE with in-batch and hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size
from torch import Tensor, nn


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
    ``batch_sampler: no_duplicates`` training argument, as in sentence-transformers.
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
        gathered = [self._gather(c) for c in candidates]
        offset = gathered[0][1]
        pool = torch.cat([g for g, _ in gathered], dim=0)
        labels = torch.arange(anchors.shape[0], device=anchors.device) + offset
        return self.scale * anchors @ pool.T, labels

    def forward(self, anchors: Tensor, candidates: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Return ``(loss, scores)``; ``candidates[0]`` are the positives, the rest hard negatives."""
        scores, labels = self.scores(anchors, candidates)
        loss = F.cross_entropy(scores, labels)
        if self.symmetric:
            reverse, reverse_labels = self.scores(candidates[0], [anchors])
            loss = (loss + F.cross_entropy(reverse, reverse_labels)) / 2
        return loss, scores
