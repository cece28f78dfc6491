"""The held-out guard of head-only training: a learned head is kept only where it ranks at least as well as the
parameter-free residual sign quantiser it started from, depth by depth.

Learned heads can overfit the texts they were trained on (BENCHMARKS.md section 6: on cranfield, one seed of
three ends below plain sign bits), and a code that ranks below sign bits of the same float cell is worse than
no training. So ``fit_heads`` holds out part of its data, and afterwards every head is scored on it at every
trained depth, by the serving path itself (packed codes, ``trainer.binary.codes.code_scores``):

- with (anchor, positive) pairs: the pairs of a random share of the anchors are held out; each held-out anchor
  ranks every item (itself excluded) and the score is nDCG@10 with its positives as the relevant items;
- without pairs: a random share of the items is held out; each ranks the held-out items and the score is
  nDCG@10 with its 10 nearest float neighbours as the relevant items.

Depth by depth, from the first trained depth up, the planes a head adds at that depth are kept only if its
mean score over the cells it serves is at least that of the same head with those planes made parameter-free
again (``BinaryHeads.reset_depth``: the blocks that make them zeroed, which is how an untrained head starts).
So the 1-bit code is never below the sign bits of the float cell on the held-out data, and each deeper code
is never below the parameter-free planes on top of the planes kept before it.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import Tensor, nn

from trainer.binary.codes import code_scores
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_vector
from trainer.grid import Cell, Grid

logger = logging.getLogger(__name__)

MAX_ANCHORS = 500
MAX_CANDIDATES = 20_000
TOP_K = 10


def split_pairs(pairs: Tensor, share: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(training pairs, held-out pairs): every pair of a random ``share`` of the distinct anchors is held out."""
    anchors = pairs[:, 0].unique()
    count = int(len(anchors) * share)
    held = anchors[torch.randperm(len(anchors), generator=generator)[:count]]
    out = torch.isin(pairs[:, 0], held)
    return pairs[~out], pairs[out]


def split_items(count: int, share: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(training rows, held-out rows) of ``count`` items, a random ``share`` held out."""
    order = torch.randperm(count, generator=generator)
    held = int(count * share)
    return order[held:].sort().values, order[:held].sort().values


def ndcg_at_10(scores: np.ndarray, relevant: list[set[int]]) -> float:
    """Mean nDCG@10 with binary gains of (anchors, candidates) ``scores``; ties keep the candidates' order."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
    discounts = 1.0 / np.log2(np.arange(2, TOP_K + 2))
    values = []
    for row, wanted in zip(top, relevant, strict=True):
        gains = np.array([j in wanted for j in row], dtype=float)
        values.append((gains * discounts).sum() / discounts[: min(len(wanted), TOP_K)].sum())
    return float(np.mean(values))


def ranking_task(
    layer_embeddings: dict[int, Tensor], held_pairs: Tensor | None, held_items: Tensor | None, seed: int
) -> tuple[Tensor, Tensor, list[set[int]]]:
    """(anchor rows, candidate rows, the relevant candidates' positions for each anchor) of the held-out data."""
    generator = torch.Generator().manual_seed(seed)
    count = len(next(iter(layer_embeddings.values())))
    if held_pairs is not None and len(held_pairs):
        anchors = held_pairs[:, 0].unique()
        anchors = anchors[torch.randperm(len(anchors), generator=generator)[:MAX_ANCHORS]]
        positives = held_pairs[torch.isin(held_pairs[:, 0], anchors)]
        others = torch.randperm(count, generator=generator)[:MAX_CANDIDATES]
        candidates = torch.cat([positives[:, 1], others]).unique()
        position = {int(row): i for i, row in enumerate(candidates)}
        relevant = [{position[int(p)] for a, p in positives.tolist() if a == int(anchor)} for anchor in anchors]
    else:
        candidates = held_items[:MAX_CANDIDATES]
        anchors = candidates[torch.randperm(len(candidates), generator=generator)[:MAX_ANCHORS]]
        last = max(layer_embeddings)
        floats = nn.functional.normalize(layer_embeddings[last], dim=-1)
        similarity = floats[anchors] @ floats[candidates].T
        similarity[anchors[:, None] == candidates[None, :]] = -torch.inf
        relevant = [set(row.tolist()) for row in similarity.topk(min(TOP_K, len(candidates) - 1)).indices]
    return anchors, candidates, relevant


def guard_heads(
    heads: BinaryHeads,
    layer_embeddings: dict[int, Tensor],
    grid: Grid,
    held_pairs: Tensor | None = None,
    held_items: Tensor | None = None,
    seed: int = 0,
) -> dict[str, dict[int, dict]]:
    """Check every head of ``heads`` depth by depth on the held-out data and reset what ranks worse than the
    parameter-free planes (module docstring); returns, per head and depth, both scores and whether the
    learned planes were kept."""
    anchors, candidates, relevant = ranking_task(layer_embeddings, held_pairs, held_items, seed)
    vectors = {
        cell: tuple(
            cell_vector({layer: layer_embeddings[layer][rows] for layer in grid.layers}, cell)
            for rows in (anchors, candidates)
        )
        for cell in grid.cells
    }
    same = (anchors[:, None] == candidates[None, :]).numpy()

    def quality(cells: list[Cell], depth: int) -> float:
        values = []
        for cell in cells:
            queries, docs = vectors[cell]
            scores = code_scores(
                heads.encode(queries, cell.with_bits(depth)), heads.encode(docs, cell.with_bits(depth))
            )
            scores[same] = -np.inf
            values.append(ndcg_at_10(scores, relevant))
        return float(np.mean(values))

    served: dict[str, list[Cell]] = {}
    for cell in grid.cells:
        served.setdefault(heads.key_for(cell), []).append(cell)
    report: dict[str, dict[int, dict]] = {}
    for key, cells in served.items():
        for depth in heads.bits:
            learned_state = copy.deepcopy(heads.heads[key].state_dict())
            learned = quality(cells, depth)
            heads.reset_depth(key, depth)
            free = quality(cells, depth)
            kept = learned >= free
            if kept:
                heads.heads[key].load_state_dict(learned_state)
            report.setdefault(key, {})[depth] = {"learned": learned, "parameter-free": free, "kept": kept}
            logger.info(
                "binary heads %s, %d bit(s): held-out nDCG@10 learned %.4f vs parameter-free %.4f: %s",
                key,
                depth,
                learned,
                free,
                "kept" if kept else "reset to the parameter-free planes",
            )
    return report
