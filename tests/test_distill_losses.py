"""Jasper/Stella distillation losses against hand-computed values, and the ElasticLoss term around them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.errors import UserError
from trainer.grid import Cell
from trainer.train.losses.distill import (
    PROJECTION_FOLDER,
    DistillationLoss,
    cosine_loss,
    relative_similarity_loss,
    similarity_loss,
)
from trainer.train.losses.elastic import CellBatch


def vectors_with_gram(gram: list[list[float]]) -> torch.Tensor:
    """Unit vectors whose pairwise dot products are ``gram`` (rows of its Cholesky factor)."""
    return torch.linalg.cholesky(torch.tensor(gram, dtype=torch.float64)).float()


# Teacher similarities t01 = .9, t02 = .5, t12 = .1; student s01 = .2, s02 = .3, s12 = .25.
TEACHER = vectors_with_gram([[1, 0.9, 0.5], [0.9, 1, 0.1], [0.5, 0.1, 1]])
STUDENT = vectors_with_gram([[1, 0.2, 0.3], [0.2, 1, 0.25], [0.3, 0.25, 1]])


def test_cosine_loss_hand_value() -> None:
    student = torch.tensor([[0.6, 0.8], [2.0, 0.0]])  # second row is normalised inside
    teacher = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # ((1 - 0.6) + (1 - 0)) / 2 = 0.7
    assert cosine_loss(student, teacher).item() == pytest.approx(0.7)


def test_similarity_loss_hand_value_with_different_widths() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # S S^T - T T^T = [[0,-1,1],[-1,0,0],[1,0,0]]: four squared ones over nine entries.
    assert similarity_loss(student, teacher).item() == pytest.approx(4 / 9)


def test_relative_loss_hand_value() -> None:
    # Teacher order 01 > 02 > 12; hinges s02-s01+m = .115, s12-s01+m = .065, s12-s02+m < 0 -> 0.
    value = relative_similarity_loss(STUDENT, TEACHER, margin=0.015)
    assert value.item() == pytest.approx((0.115 + 0.065 + 0.0) / 3, abs=1e-6)


def test_relative_loss_zero_when_student_orders_like_teacher_with_margin() -> None:
    assert relative_similarity_loss(TEACHER, TEACHER, margin=0.015).item() == 0.0
    # Gaps .4, .8, .4: a margin of .5 makes the same student pay .1 on the two .4 gaps.
    assert relative_similarity_loss(TEACHER, TEACHER, margin=0.5).item() == pytest.approx((0.1 + 0.0 + 0.1) / 3)


def test_relative_loss_ignores_ties_and_keeps_graph() -> None:
    teacher = F.normalize(torch.ones(3, 4), dim=-1)  # every pair ties: no ordered pair of pairs
    student = torch.randn(3, 4, requires_grad=True)
    value = relative_similarity_loss(student, teacher, margin=0.015)
    value.backward()
    assert value.item() == 0.0 and student.grad is not None


def test_relative_loss_pair_subsample_estimates_full_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    student = F.normalize(torch.randn(32, 16, generator=generator), dim=-1)
    teacher = F.normalize(student + 0.5 * torch.randn(32, 16, generator=generator), dim=-1)
    exact = relative_similarity_loss(student, teacher, 0.015).item()
    assert relative_similarity_loss(student, teacher, 0.015, max_pairs=496).item() == pytest.approx(exact)
    torch.manual_seed(0)
    estimates = [relative_similarity_loss(student, teacher, 0.015, max_pairs=200).item() for _ in range(30)]
    assert sum(estimates) / len(estimates) == pytest.approx(exact, rel=0.05)
    assert len(set(estimates)) > 1  # really a subsample


def make_batch(n: int, dims: dict[Cell, int], teacher_dim: int, columns: int = 2) -> CellBatch:
    torch.manual_seed(0)
    full = max(dims)
    embeddings = {cell: [F.normalize(torch.randn(n, cell.dim), dim=-1) for _ in range(columns)] for cell in dims}
    return CellBatch(embeddings, [], full, torch.randn(n, columns, teacher_dim))


def test_term_components_and_weights() -> None:
    cells = {Cell(2, 8): 8, Cell(4, 16): 16}
    batch = make_batch(5, cells, teacher_dim=16)
    term = DistillationLoss(16, 16, cosine_weight=3.0, similarity_weight=7.0, relative_weight=2.0, margin=0.1)
    losses = term(batch)
    assert set(losses) == {"cos/L4-D16", "sim/L2-D8", "sim/L4-D16", "rel/L2-D8", "rel/L4-D16"}
    assert term.projection is None
    teacher = F.normalize(torch.cat([batch.labels[:, 0], batch.labels[:, 1]]), dim=-1)
    student_full = torch.cat(batch.embeddings[Cell(4, 16)])
    student_small = torch.cat(batch.embeddings[Cell(2, 8)])
    assert losses["cos/L4-D16"].item() == pytest.approx(3.0 * cosine_loss(student_full, teacher).item())
    # similarity and relative are means over the cells: each cell's component is weight / 2 of its loss
    assert losses["sim/L2-D8"].item() == pytest.approx(7.0 / 2 * similarity_loss(student_small, teacher).item())
    assert losses["rel/L2-D8"].item() == pytest.approx(2.0 / 2 * relative_similarity_loss(student_small, teacher, 0.1))


def test_layers_limit_the_term_to_their_cells_and_codes() -> None:
    cells = {Cell(2, 8): 8, Cell(4, 16): 16}
    batch = make_batch(5, cells, teacher_dim=16)
    batch.codes = {
        Cell(2, 8).with_bits(1): batch.embeddings[Cell(2, 8)],
        Cell(4, 16).with_bits(1): batch.embeddings[Cell(4, 16)],
    }
    every = DistillationLoss(16, 16, similarity_weight=7.0, relative_weight=2.0, margin=0.1)(batch)
    early = DistillationLoss(16, 16, similarity_weight=7.0, relative_weight=2.0, margin=0.1, layers=(2,))(batch)
    # no cosine term (the full cell is at layer 4) and no component of a layer-4 cell or code
    assert set(early) == {"sim/L2-D8", "sim/L2-D8-B1", "rel/L2-D8", "rel/L2-D8-B1"}
    assert DistillationLoss(16, 32, cosine_weight=0.0).projection is None  # nothing would train it
    # the means now run over the two layer-2 components instead of all four
    assert early["sim/L2-D8"].item() == pytest.approx(2 * every["sim/L2-D8"].item())
    assert early["rel/L2-D8-B1"].item() == pytest.approx(2 * every["rel/L2-D8-B1"].item())


def test_layer_weights_give_each_layer_its_own_share() -> None:
    cells = {Cell(2, 8): 8, Cell(2, 16): 16, Cell(4, 16): 16}
    batch = make_batch(5, cells, teacher_dim=16)
    batch.codes = {Cell(4, 16).with_bits(1): batch.embeddings[Cell(4, 16)]}
    settings = dict(cosine_weight=3.0, similarity_weight=7.0, relative_weight=2.0, margin=0.1, relative_max_pairs=None)
    last = DistillationLoss(16, 16, layers=(4,), **settings)(batch)
    weighted = DistillationLoss(16, 16, layers={4: 1.0, 2: 0.25}, **settings)(batch)
    # the last layer keeps exactly the share it has alone: {4: 1.0} adds layer 2, it does not dilute layer 4
    for name, value in last.items():
        assert weighted[name].item() == pytest.approx(value.item())
    # layer 2's two cells share 0.25 x the weight: each component is weight * 0.25 / 2 of its loss
    small, teacher = torch.cat(batch.embeddings[Cell(2, 8)]), DistillationLoss(16, 16).teacher_vectors(batch.labels, 2)
    assert weighted["sim/L2-D8"].item() == pytest.approx(7.0 * 0.25 / 2 * similarity_loss(small, teacher).item())
    assert set(weighted) == set(last) | {"sim/L2-D8", "sim/L2-D16", "rel/L2-D8", "rel/L2-D16"}
    # the cosine term is the full cell's: scaled by the full cell's layer weight
    half = DistillationLoss(16, 16, layers={4: 0.5}, **settings)(batch)
    assert half["cos/L4-D16"].item() == pytest.approx(0.5 * last["cos/L4-D16"].item())
    assert DistillationLoss(16, 16, layers={4: 1.0, 2: 0.25}).get_config_dict()["layers"] == {2: 0.25, 4: 1.0}


def test_term_is_zero_when_student_equals_teacher() -> None:
    teacher = F.normalize(torch.randn(6, 8), dim=-1)
    batch = CellBatch({Cell(3, 8): [teacher.clone()]}, [], Cell(3, 8), 5.0 * teacher.unsqueeze(1))
    losses = DistillationLoss(8, 8, margin=0.0)(batch)
    assert all(value.item() == pytest.approx(0.0, abs=1e-5) for value in losses.values())


def test_zero_weight_drops_component() -> None:
    batch = make_batch(4, {Cell(2, 8): 8}, teacher_dim=8)
    assert set(DistillationLoss(8, 8, relative_weight=0.0)(batch)) == {"cos/L2-D8", "sim/L2-D8"}


def test_projection_learns_when_widths_differ_and_round_trips(tmp_path) -> None:
    batch = make_batch(4, {Cell(2, 4): 4, Cell(3, 8): 8}, teacher_dim=12)
    term = DistillationLoss(8, 12)
    assert (
        term.projection is not None
        and term.projection.linear.in_features == 8
        and term.projection.linear.out_features == 12
    )
    losses = term(batch)
    sum(losses.values()).backward()
    assert term.projection.linear.weight.grad is not None and term.projection.linear.weight.grad.abs().sum() > 0
    term.save_pretrained(tmp_path)
    assert (tmp_path / PROJECTION_FOLDER / "model.safetensors").is_file()
    other = DistillationLoss(8, 12)
    assert not torch.equal(other.projection.linear.weight, term.projection.linear.weight)
    other.load_state(tmp_path)
    assert torch.equal(other.projection.linear.weight, term.projection.linear.weight)
    assert torch.equal(other.projection.linear.bias, term.projection.linear.bias)


def test_load_state_without_file_fails(tmp_path) -> None:
    with pytest.raises(UserError, match="distill_projection"):
        DistillationLoss(8, 12).load_state(tmp_path)


def test_labels_must_match_columns_and_width() -> None:
    batch = make_batch(4, {Cell(2, 8): 8}, teacher_dim=8, columns=2)
    with pytest.raises(ValueError, match=r"expected \(batch, 2, 10\)"):
        DistillationLoss(8, 10)(batch)
    batch.labels = None
    with pytest.raises(ValueError, match="label"):
        DistillationLoss(8, 8)(batch)


def test_single_column_labels_may_be_two_dimensional() -> None:
    batch = make_batch(4, {Cell(2, 8): 8}, teacher_dim=8, columns=1)
    flat = CellBatch(batch.embeddings, [], batch.full, batch.labels[:, 0])
    assert {k: v.item() for k, v in DistillationLoss(8, 8)(flat).items()} == pytest.approx(
        {k: v.item() for k, v in DistillationLoss(8, 8)(batch).items()}
    )
    assert not math.isnan(DistillationLoss(8, 8)(flat)["sim/L2-D8"].item())


def test_blockwise_similarity_and_relative_losses_equal_the_dense_formulas_with_gradients():
    generator = torch.Generator().manual_seed(3)
    n = 300  # the similarity rows span two blocks; the 44,850 pairs are subsampled to 700, three blocks
    student = F.normalize(torch.randn(n, 6, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    teacher = F.normalize(torch.randn(n, 10, generator=generator, dtype=torch.float64), dim=-1)
    similarity = similarity_loss(student, teacher)
    dense = ((student @ student.T - teacher @ teacher.T) ** 2).mean()
    torch.testing.assert_close(similarity, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(similarity, student)[0], torch.autograd.grad(dense, student)[0])

    torch.manual_seed(5)
    relative = relative_similarity_loss(student, teacher, margin=0.1, max_pairs=700)
    torch.manual_seed(5)  # the same pairs, compared as one dense P x P matrix
    first, second = torch.randint(n, (700,)), torch.randint(n - 1, (700,))
    second = second + (second >= first)
    rows, cols = torch.minimum(first, second), torch.maximum(first, second)
    s, t = (student[rows] * student[cols]).sum(-1), (teacher[rows] * teacher[cols]).sum(-1)
    ordered = t[:, None] > t[None, :]
    dense = F.relu(s[None, :] - s[:, None] + 0.1)[ordered].mean()
    torch.testing.assert_close(relative, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(relative, student)[0], torch.autograd.grad(dense, student)[0])
