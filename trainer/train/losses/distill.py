"""Distillation from a teacher's embeddings at every cell (Jasper and Stella losses).

Zhang et al. 2024, "Jasper and Stella: distillation of SOTA embedding models" (arXiv:2412.19048), with s the
unit student vectors and t the unit teacher vectors of the N texts of a batch:

    cosine      L_cos = mean_i (1 - s_i . t_i)                      (the full cell, through a projection)
    similarity  L_sim = MSE(S S^T, T T^T)                            (every cell and code: their mean)
    relative    L_rel = mean over pairs of pairs (i,j), (m,n) with t_i.t_j > t_m.t_n of
                        max(0, s_m.s_n - s_i.s_j + margin)           (every cell and code: their mean)

The paper sums the cosine term over the batch and trains one model; here it is a mean over the batch and the
similarity and relative terms are means over the step's cells and codes, so each term's share of the
objective depends on its weight only, not on the batch size or the size of the grid.

The similarity and relative losses compare in-batch similarities, so any cell (any dim) can be compared with
the teacher's full-size similarities and only the cosine loss needs a projection when the widths differ.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from trainer.errors import UserError
from trainer.train.losses.elastic import CellBatch, group_mean
from trainer.train.losses.infonce import blockwise_sum, gather_rows

PROJECTION_FOLDER = "distill_projection"


class TeacherProjection(nn.Module, PyTorchModelHubMixin, library_name="elastic-embeddings"):
    """``Linear(student_dim, teacher_dim)``: maps the student's full cell to the teacher's width for L_cos."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_i (1 - s_i . t_i)`` over the rows of two (N, d) tensors, each row normalised to unit length here."""
    return (1 - (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(dim=-1)).mean()


def similarity_loss(
    student: Tensor, teacher: Tensor, all_student: Tensor | None = None, all_teacher: Tensor | None = None
) -> Tensor:
    """``MSE(S S^T, T T^T)`` of unit (N, d_s) student and (N, d_t) teacher vectors; the widths may differ.

    With ``all_student`` and ``all_teacher`` (the rows of every process, these included) it compares this
    process's rows with all rows, ``MSE(S A^T, T B^T)``; with equal row counts, the mean over processes is
    the loss of the concatenated batch. Computed over blocks of rows (``blockwise_sum``): no N x N
    similarity matrix is kept for the backward pass.
    """
    all_student = student if all_student is None else all_student
    all_teacher = teacher if all_teacher is None else all_teacher
    total = blockwise_sum(_squared_error_sum, [student, teacher], [all_student, all_teacher])
    return total / (len(student) * len(all_student))


def _squared_error_sum(student: Tensor, teacher: Tensor, all_student: Tensor, all_teacher: Tensor) -> Tensor:
    return (student @ all_student.T - teacher @ all_teacher.T).pow(2).sum()


def _hinge_sum(student_sims: Tensor, teacher_sims: Tensor, all_student: Tensor, all_teacher: Tensor, margin: float):
    ordered = teacher_sims[:, None] > all_teacher[None, :]  # [p, q]: the teacher ranks pair p above pair q
    return (F.relu(all_student[None, :] - student_sims[:, None] + margin) * ordered).sum()


def relative_similarity_loss(student: Tensor, teacher: Tensor, margin: float, max_pairs: int | None = None) -> Tensor:
    """Mean hinge ``max(0, s_m.s_n - s_i.s_j + margin)`` over pairs of pairs the teacher orders ``t_i.t_j > t_m.t_n``.

    The P = N(N-1)/2 text pairs i < j of the batch are listed once; all P x P comparisons are then one
    broadcast (P = 496, P^2 ~ 246k for N = 32). When P exceeds ``max_pairs``, ``max_pairs`` pairs drawn
    uniformly at random are compared instead (an estimate of the same mean); they are drawn without listing
    all P pairs. The comparisons run over blocks of pairs (``blockwise_sum``), so no P x P matrix is kept
    for the backward pass. Returns 0 when no pair is strictly ordered by the teacher.
    """
    n = len(student)
    if max_pairs is not None and n * (n - 1) // 2 > max_pairs:
        first = torch.randint(n, (max_pairs,), device=student.device)
        second = torch.randint(n - 1, (max_pairs,), device=student.device)
        second = second + (second >= first)  # uniform over the other n - 1 texts
        rows, cols = torch.minimum(first, second), torch.maximum(first, second)
    else:
        rows, cols = torch.triu_indices(n, n, offset=1, device=student.device)
    student_sims = (student[rows] * student[cols]).sum(dim=-1)
    teacher_sims = (teacher[rows] * teacher[cols]).sum(dim=-1)
    # the number of ordered (p, q): for each pair p, the pairs q the teacher scores strictly lower
    ordered = torch.searchsorted(teacher_sims.sort().values, teacher_sims, side="left").sum()
    if ordered == 0:
        return student_sims.sum() * 0.0
    block = partial(_hinge_sum, margin=margin)
    return blockwise_sum(block, [student_sims, teacher_sims], [student_sims, teacher_sims]) / ordered


def distils(layers: Iterable[int] | None, layer: int) -> bool:
    """Whether the cells of layer exit ``layer`` are distilled when ``layers`` are listed (None: every layer)."""
    return layers is None or layer in layers


class DistillationLoss(nn.Module):
    """Jasper/Stella distillation term of ``ElasticLoss``: cosine at the full cell, similarity and relative at all.

    ``batch.labels`` holds the teacher embeddings of every text column, shape (N, n_columns, teacher_dim) (or (N,
    teacher_dim) for one column); the texts of all columns form one in-batch similarity matrix. The full cell's student
    vectors go through a learned ``nn.Linear(student_dim, teacher_dim)`` before the cosine loss when the widths differ
    (identity otherwise; none without a cosine term); save it with ``save_pretrained`` on every checkpoint and restore
    it with ``load_state``. With binarization heads the similarity and relative losses also apply to every code in
    ``batch.codes`` (``sim/L4-D128-B1``), against the same full-size teacher similarities. Components are named
    ``cos/<cell>``, ``sim/<cell>`` and ``rel/<cell>``, each scaled by its group's ``weight / n``. Defaults are the
    paper's 10 / 200 / 20 and margin 0.015.

    ``layers``: the layer exits whose cells and codes are distilled (None: all). A teacher can be a good one
    for shallow cells and a bad one for the last layer (BENCHMARKS.md §5); the cosine term, which belongs
    to the full cell, applies only when the full cell's layer is listed. A mapping ``{layer: w_l}`` gives each
    layer its own share instead of one mean over all cells: the similarity and relative terms become
    ``weight * sum_l w_l * (mean over layer l's cells and codes)`` and the cosine term is scaled by the full
    cell's ``w_l``, so ``{6: 1.0}`` is ``[6]`` and adding a layer leaves the others' shares as they were.

    ``gather_across_devices``: in distributed training the in-batch similarities span the texts of every
    process (``trainer.train.losses.infonce.gather_rows``): the similarity loss compares this process's
    texts with all texts, the relative loss ranks pairs drawn from all texts; averaged over processes, both
    are the losses of the concatenated batch (the relative loss exactly while its pairs are not subsampled).
    """

    citation = """@article{zhang2024jasper,
  title   = {Jasper and Stella: distillation of SOTA embedding models},
  author  = {Zhang, Dun and Li, Jiacheng and Zeng, Ziyang and Wang, Fulong},
  journal = {arXiv preprint arXiv:2412.19048},
  year    = {2024}
}"""

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        cosine_weight: float = 10.0,
        similarity_weight: float = 200.0,
        relative_weight: float = 20.0,
        margin: float = 0.015,
        relative_max_pairs: int | None = 2048,
        gather_across_devices: bool = False,
        layers: Sequence[int] | Mapping[int, float] | None = None,
    ) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.cosine_weight, self.similarity_weight, self.relative_weight = (
            cosine_weight,
            similarity_weight,
            relative_weight,
        )
        self.margin, self.relative_max_pairs = margin, relative_max_pairs
        self.gather_across_devices = gather_across_devices
        self.layer_weights = dict(sorted(layers.items())) if isinstance(layers, Mapping) else None
        self.layers = None if layers is None else tuple(sorted(set(layers)))
        needs_projection = student_dim != teacher_dim and cosine_weight > 0
        self.projection = TeacherProjection(student_dim, teacher_dim) if needs_projection else None

    def teacher_vectors(self, labels: Tensor | None, n_columns: int) -> Tensor:
        """Unit teacher vectors of all texts, columns concatenated like the student's: (N * n_columns, teacher_dim)."""
        if labels is None:
            raise ValueError("distillation needs the teacher embeddings in the dataset's 'label' column")
        labels = labels.float()
        if labels.dim() == 2:
            labels = labels.unsqueeze(1)
        if labels.dim() != 3 or labels.shape[1] != n_columns or labels.shape[2] != self.teacher_dim:
            raise ValueError(
                f"teacher labels have shape {tuple(labels.shape)}; expected (batch, {n_columns}, {self.teacher_dim})"
            )
        return F.normalize(torch.cat(labels.unbind(dim=1)), dim=-1)

    def forward(self, batch: CellBatch) -> dict[str, Tensor]:
        full_columns = batch.embeddings[batch.full]
        if batch.full.dim != self.student_dim:
            raise ValueError(f"the full cell {batch.full.name2d} has dim {batch.full.dim}, not {self.student_dim}")
        teacher = self.teacher_vectors(batch.labels, len(full_columns)).to(full_columns[0].device)
        losses: dict[str, Tensor] = {}
        shares = self.layer_weights or {None: 1.0}  # each group's w_l; None: one group of every distilled cell
        if self.cosine_weight and distils(self.layers, batch.full.layers):
            student = torch.cat(full_columns)
            projected = self.projection(student) if self.projection is not None else student
            weight = self.cosine_weight * shares[self.share_group(batch.full.layers)]
            losses[f"cos/{batch.full.name2d}"] = weight * cosine_loss(projected, teacher)
        named = [(cell.name2d, cell, columns) for cell, columns in batch.embeddings.items()]
        named += [(str(cell), cell, columns) for cell, columns in batch.codes.items()]
        cells = [(name, cell, columns) for name, cell, columns in named if distils(self.layers, cell.layers)]
        all_teacher = gather_rows(teacher)[0] if self.gather_across_devices else teacher
        similarity, relative = {group: {} for group in shares}, {group: {} for group in shares}
        for name, cell, columns in cells:
            group = self.share_group(cell.layers)
            student = torch.cat(columns)
            all_student = gather_rows(student)[0] if self.gather_across_devices else student
            if self.similarity_weight:
                similarity[group][f"sim/{name}"] = similarity_loss(student, teacher, all_student, all_teacher)
            if self.relative_weight:
                relative[group][f"rel/{name}"] = relative_similarity_loss(
                    all_student, all_teacher, self.margin, self.relative_max_pairs
                )
        for group, share in shares.items():
            losses.update(group_mean(similarity[group], self.similarity_weight * share))
            losses.update(group_mean(relative[group], self.relative_weight * share))
        return losses

    def share_group(self, layer: int) -> int | None:
        """The group whose mean the cells of layer exit ``layer`` join: that layer with layer weights, else None
        (one group of every distilled cell)."""
        return None if self.layer_weights is None else layer

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "teacher_dim": self.teacher_dim,
            "cosine_weight": self.cosine_weight,
            "similarity_weight": self.similarity_weight,
            "relative_weight": self.relative_weight,
            "margin": self.margin,
            "relative_max_pairs": self.relative_max_pairs,
            "gather_across_devices": self.gather_across_devices,
            "layers": self.layer_weights or (None if self.layers is None else list(self.layers)),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the projection (if any) to ``<directory>/distill_projection/`` (config.json + safetensors)."""
        if self.projection is not None:
            self.projection.save_pretrained(Path(directory) / PROJECTION_FOLDER)

    def load_state(self, directory: str | Path) -> None:
        """Restore the projection saved by ``save_pretrained``; a missing one is an error when one is needed."""
        if self.projection is None:
            return
        folder = Path(directory) / PROJECTION_FOLDER
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: no saved distillation projection to resume from")
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints where it loads from
            saved = TeacherProjection.from_pretrained(str(folder), strict=True)
        self.projection.load_state_dict(saved.state_dict())
