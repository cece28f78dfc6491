import copy
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.cell_vectors import layer_embeddings
from trainer.grid import Cell, CellSelection, Grid
from trainer.train.losses import CellBatch, ElasticLoss, InfoNCELoss, Matryoshka2dLoss


def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def hand_infonce(anchors, candidates, scale):
    """-1/N sum_i log(exp(s_ii) / sum_j exp(s_ij)) with plain Python arithmetic."""
    total = 0.0
    for i, a in enumerate(anchors.tolist()):
        scores = [scale * sum(x * y for x, y in zip(a, c, strict=True)) for c in candidates.tolist()]
        total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    return total / len(anchors)


def test_infonce_matches_hand_computation_with_hard_negatives():
    anchors = unit([[1.0, 0.0, 0.2], [0.3, 1.0, 0.0]])
    positives = unit([[0.9, 0.1, 0.0], [0.0, 1.0, 0.5]])
    negatives = unit([[1.0, 0.2, 0.1], [0.2, 0.8, 0.0]])
    loss = InfoNCELoss(scale=5.0)(anchors, [positives, negatives])
    expected = hand_infonce(anchors, torch.cat([positives, negatives]), 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert InfoNCELoss(scale=5.0).scores(anchors, [positives, negatives])[0].shape == (2, 4)


def test_symmetric_infonce_averages_both_directions():
    anchors = unit([[1.0, 0.0], [0.6, 0.8]])
    positives = unit([[0.8, 0.6], [0.0, 1.0]])
    loss = InfoNCELoss(scale=3.0, symmetric=True)(anchors, [positives])
    expected = (hand_infonce(anchors, positives, 3.0) + hand_infonce(positives, anchors, 3.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_matryoshka_term_adds_kl_to_the_detached_full_cell():
    full, small = Cell(2, 3), Cell(1, 2)
    a_full, p_full = unit([[1.0, 0.0, 0.1], [0.0, 1.0, 0.3]]), unit([[0.9, 0.2, 0.0], [0.1, 1.0, 0.0]])
    a_small = unit([[1.0, 0.4], [0.2, 1.0]]).requires_grad_(True)
    p_small = unit([[1.0, 0.0], [0.5, 1.0]])
    batch = CellBatch({full: [a_full, p_full], small: [a_small, p_small]}, [{}, {}], full, None)
    term = Matryoshka2dLoss(
        InfoNCELoss(scale=4.0), full_weight=3.0, layers_weight=0.5, kl_weight=2.0, kl_temperature=2.0
    )
    out = term(batch)
    assert set(out) == {"loss/L2-D3", "loss/L1-D2", "kl/L1-D2"}
    small_loss = hand_infonce(a_small.detach(), p_small, 4.0)
    assert out["loss/L1-D2"].item() == pytest.approx(0.5 * small_loss, rel=1e-9)
    assert out["loss/L2-D3"].item() == pytest.approx(3.0 * hand_infonce(a_full, p_full, 4.0), rel=1e-9)
    p = torch.softmax(4.0 * a_full @ p_full.T / 2.0, dim=-1)
    q = torch.softmax(4.0 * a_small.detach() @ p_small.T / 2.0, dim=-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert out["kl/L1-D2"].item() == pytest.approx(2.0 * kl, rel=1e-9)


def test_each_group_is_a_mean_so_adding_cells_keeps_the_shares():
    """full / last-layer dims / earlier layers / KL each add weight x (mean over the group) to the objective."""
    generator = torch.Generator().manual_seed(0)
    anchors = F.normalize(torch.randn(4, 8, generator=generator, dtype=torch.float64), dim=-1)
    positives = F.normalize(anchors + 0.5 * torch.randn(4, 8, generator=generator, dtype=torch.float64), dim=-1)
    cells = [Cell(3, 8), Cell(3, 4), Cell(3, 2), Cell(1, 2), Cell(2, 4), Cell(2, 8)]
    embeddings = {
        c: [F.normalize(anchors[:, : c.dim], dim=-1), F.normalize(positives[:, : c.dim], dim=-1)] for c in cells
    }
    batch = CellBatch(embeddings, [{}, {}], Cell(3, 8), None)
    out = Matryoshka2dLoss(InfoNCELoss(scale=5.0), full_weight=1.0, dims_weight=2.0, layers_weight=3.0, kl_weight=0.0)(
        batch
    )

    def infonce(cell):
        return hand_infonce(*embeddings[cell], 5.0)

    assert out["loss/L3-D8"].item() == pytest.approx(infonce(Cell(3, 8)), rel=1e-9)
    dims = [Cell(3, 4), Cell(3, 2)]
    assert sum(out[f"loss/{c.name2d}"].item() for c in dims) == pytest.approx(2.0 * sum(map(infonce, dims)) / 2)
    earlier = [Cell(1, 2), Cell(2, 4), Cell(2, 8)]
    assert sum(out[f"loss/{c.name2d}"].item() for c in earlier) == pytest.approx(3.0 * sum(map(infonce, earlier)) / 3)


def test_kl_can_leave_the_last_layer_to_matryoshka():
    """kl_last_layer=False: the KL group is the mean over the earlier-layer cells only, same values as before."""
    generator = torch.Generator().manual_seed(1)
    anchors = F.normalize(torch.randn(4, 8, generator=generator, dtype=torch.float64), dim=-1)
    positives = F.normalize(anchors + 0.5 * torch.randn(4, 8, generator=generator, dtype=torch.float64), dim=-1)
    cells = [Cell(3, 8), Cell(3, 4), Cell(1, 2), Cell(2, 4)]
    embeddings = {c: [F.normalize(x[:, : c.dim] + 0.1 * c.layers, dim=-1) for x in (anchors, positives)] for c in cells}
    batch = CellBatch(embeddings, [{}, {}], Cell(3, 8), None)
    every = Matryoshka2dLoss(InfoNCELoss(scale=5.0), kl_weight=2.0)(batch)
    earlier = Matryoshka2dLoss(InfoNCELoss(scale=5.0), kl_weight=2.0, kl_last_layer=False)(batch)
    assert {k for k in every if k.startswith("kl/")} == {"kl/L3-D4", "kl/L1-D2", "kl/L2-D4"}
    assert {k for k in earlier if k.startswith("kl/")} == {"kl/L1-D2", "kl/L2-D4"}
    for name in ("kl/L1-D2", "kl/L2-D4"):  # a mean over 2 cells instead of 3
        assert earlier[name].item() == pytest.approx(every[name].item() * 3 / 2, rel=1e-12)
    assert {k: v.item() for k, v in earlier.items() if k.startswith("loss/")} == {
        k: v.item() for k, v in every.items() if k.startswith("loss/")
    }


def test_kl_gradient_reaches_only_the_small_cell():
    full, small = Cell(2, 2), Cell(1, 2)
    a_full = unit([[1.0, 0.1], [0.2, 1.0]]).requires_grad_(True)
    a_small = unit([[1.0, 0.5], [0.5, 1.0]]).requires_grad_(True)
    positives = unit([[1.0, 0.0], [0.0, 1.0]])
    batch = CellBatch({full: [a_full, positives], small: [a_small, positives]}, [{}, {}], full, None)
    Matryoshka2dLoss(InfoNCELoss(), kl_weight=1.0)(batch)["kl/L1-D2"].backward()
    assert a_full.grad is None and a_small.grad.abs().sum() > 0


def test_starbucks_selection_is_every_cell_plus_every_dim_of_the_last_layer():
    grid = Grid.from_spec(cells=["L1-D8", "L2-D16"])
    selection = CellSelection(grid, Cell(4, 32), "starbucks")
    assert selection.cells_for_step() == [Cell(1, 8), Cell(2, 16), Cell(4, 8), Cell(4, 16), Cell(4, 32)]


def test_2dmse_selection_samples_one_earlier_layer_and_one_dim_beside_the_last_layer():
    grid = Grid.from_spec(layers=[1, 2, 3, 4], dims=[8, 16, 32])
    selection = CellSelection(grid, Cell(4, 32), "2dmse", seed=0)
    last_layer = [Cell(4, 8), Cell(4, 16), Cell(4, 32)]
    seen = set()
    for _ in range(30):
        cells = selection.cells_for_step()
        earlier = [c for c in cells if c.layers < 4]
        assert set(last_layer) <= set(cells) and len(earlier) == 2
        assert len({c.layers for c in earlier}) == 1 and {c.dim for c in earlier} >= {32}
        seen.update(earlier)
    assert len(seen) > 4  # sampling actually varies
    again = CellSelection(grid, Cell(4, 32), "2dmse", seed=0)
    assert again.cells_for_step() == CellSelection(grid, Cell(4, 32), "2dmse", seed=0).cells_for_step()


def test_2dmse_sampler_state_round_trips():
    grid = Grid.from_spec(layers=[1, 2, 3, 4], dims=[8, 16, 32])
    selection = CellSelection(grid, Cell(4, 32), "2dmse", seed=3)
    selection.cells_for_step()
    state = selection.state_dict()
    expected = [selection.cells_for_step() for _ in range(5)]
    resumed = CellSelection(grid, Cell(4, 32), "2dmse", seed=99)
    resumed.load_state_dict(state)
    assert [resumed.cells_for_step() for _ in range(5)] == expected


def test_layer_embedding_equals_a_physically_truncated_model(tiny_model):
    texts = ["a wing in a slipstream", "boundary layers", "shock waves at high speed"]
    features = tiny_model.preprocess(texts)
    with torch.no_grad():
        layers = layer_embeddings(tiny_model, features, [2, 4])
        truncated = copy.deepcopy(tiny_model)
        encoder = truncated[0].auto_model.encoder
        encoder.layer = encoder.layer[:2]
        truncated[0].auto_model.config.num_hidden_layers = 2
        expected = truncated(dict(features))["sentence_embedding"]
        assert torch.allclose(layers[2], expected, atol=1e-6)
        assert torch.allclose(layers[4], tiny_model(dict(features))["sentence_embedding"], atol=1e-6)


def test_elastic_loss_runs_the_model_once_per_input_column(tiny_model):
    calls = []
    transformer = tiny_model[0]
    original = transformer.forward
    transformer.forward = lambda features, **kw: calls.append(1) or original(features, **kw)
    grid = Grid.from_spec(cells=["L1-D8", "L2-D16", "L3-D24"])
    selection = CellSelection(grid, Cell(4, 32), "starbucks")
    loss = ElasticLoss(tiny_model, selection, {"matryoshka": Matryoshka2dLoss(InfoNCELoss())})
    columns = [tiny_model.preprocess(["query one", "query two"]), tiny_model.preprocess(["doc one", "doc two"])]
    out = loss(columns, None)
    assert len(calls) == 2
    expected = {"loss/L1-D8", "loss/L2-D16", "loss/L3-D24", "loss/L4-D8", "loss/L4-D16", "loss/L4-D24", "loss/L4-D32"}
    assert {k for k in out if k.startswith("loss/")} == expected
    torch.stack(list(out.values())).sum().backward()
    first_layer = transformer.auto_model.encoder.layer[0].attention.self.query.weight
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0


def largest_saved_tensor(compute) -> tuple[torch.Tensor, int]:
    """``compute()`` and the element count of the largest tensor its autograd graph keeps for backward."""
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = compute()
    return value, max(sizes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_blockwise_infonce_and_kl_equal_the_score_matrix_formulas_and_keep_no_score_matrix(symmetric):
    from trainer.train.losses.infonce import score_kl

    generator = torch.Generator().manual_seed(0)
    n, dim = 600, 8  # 600 rows = two full blocks of 256 and a ragged one

    def rows():
        return F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()

    anchors, positives, negatives = rows(), rows(), rows()
    target_anchors, target_positives = rows(), rows()
    infonce = InfoNCELoss(scale=7.0, symmetric=symmetric)

    def blockwise():
        loss = infonce(anchors, [positives, negatives])
        target_pool, pool = infonce.pool([target_positives])[0], infonce.pool([positives])[0]
        return loss + infonce.kl(target_anchors, target_pool, anchors, pool, temperature=0.5)

    def dense():
        scores, labels = infonce.scores(anchors, [positives, negatives])
        loss = F.cross_entropy(scores, labels)
        if symmetric:
            reverse, reverse_labels = infonce.scores(positives, [anchors, negatives][:1])
            loss = (loss + F.cross_entropy(reverse, reverse_labels)) / 2
        target = infonce.scores(target_anchors, [target_positives])[0]
        return loss + score_kl(target, infonce.scores(anchors, [positives])[0], temperature=0.5)

    value, largest = largest_saved_tensor(blockwise)
    assert largest < n * n  # no anchors x candidates matrix is kept for the backward pass
    inputs = [anchors, positives, negatives, target_anchors, target_positives]
    got = torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)
    reference = dense()
    expected = torch.autograd.grad(reference, inputs, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[3].abs().sum() == 0 and got[4].abs().sum() == 0  # the KL target is detached
