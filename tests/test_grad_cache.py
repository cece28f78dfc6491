"""Gradient caching (``loss.mini_batch_size``): the same loss values and gradients as without it, for every term."""

import copy

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges

from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import layer_embeddings
from trainer.grid import Cell, CellSelection, Grid
from trainer.train.losses import ElasticLoss, InfoNCELoss, Matryoshka2dLoss
from trainer.train.losses.binary import BinaryCodeLoss
from trainer.train.losses.distill import DistillationLoss

BITS = (1, 2, 4)
TEACHER_DIM = 12
BATCH, MINI_BATCH = 11, 4  # mini-batches of 4, 4 and 3 rows


def full_recipe_loss(model: SentenceTransformer, mini_batch_size: int | None) -> ElasticLoss:
    """2dmse sampling, 1/2/4-bit heads (moved away from their zero start, so every head parameter gets a
    gradient) and distillation through a projection: every kind of parameter the loss can train."""
    grid = Grid.from_spec(cells=["L1-D8", "L2-D16", "L3-D24", "L4-D32"])
    selection = CellSelection(grid, Cell(4, 32), "2dmse", n_layers_per_step=2, n_dims_per_step=2, seed=5)
    torch.manual_seed(1)
    heads = BinaryHeads(dims={*grid.dims}, bits=BITS, hidden=16)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    terms = {
        "matryoshka": Matryoshka2dLoss(InfoNCELoss(scale=20.0)),
        "binary": BinaryCodeLoss(heads, BITS, InfoNCELoss(scale=10.0)),
        "distill": DistillationLoss(32, TEACHER_DIM, relative_max_pairs=None),
    }
    return ElasticLoss(model, selection, terms, heads, BITS, code_encoder_grad=0.5, mini_batch_size=mini_batch_size)


def batch(model: SentenceTransformer) -> tuple[list[dict], torch.Tensor]:
    """Anchors, positives and hard negatives of different lengths, and teacher embeddings for all three."""
    anchors = [f"question {i} " + "about wings " * (i % 4) for i in range(BATCH)]
    positives = [f"answer {i} " + "lift and drag " * (i % 5) for i in range(BATCH)]
    negatives = [f"unrelated text {i}" + " noise" * (i % 3) for i in range(BATCH)]
    features = [model.preprocess(texts) for texts in (anchors, positives, negatives)]
    labels = torch.randn(BATCH, 3, TEACHER_DIM, generator=torch.Generator().manual_seed(2))
    return features, labels


def gradients(loss: ElasticLoss, features, labels, seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Logged components and the gradient of every trainable parameter after one backward pass of their sum."""
    loss.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    components = loss([dict(f) for f in features], labels)
    torch.stack(list(components.values())).sum().backward()
    values = {name: value.item() for name, value in components.items()}
    return values, {name: p.grad.clone() for name, p in loss.named_parameters() if p.grad is not None}


def assert_same_gradients(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture
def float64_model(tiny_model_path):
    return SentenceTransformer(str(tiny_model_path)).double()


def test_cached_gradients_equal_uncached_ones_for_every_parameter(float64_model):
    float64_model.eval()  # no dropout: one forward pass of the batch and mini-batch passes draw no masks
    uncached = full_recipe_loss(float64_model, None)
    cached = copy.deepcopy(uncached)
    cached.mini_batch_size = MINI_BATCH
    features, labels = batch(float64_model)
    for term in (uncached, cached):
        term.heads.train()  # BatchNorm in training mode, on the whole batch in both
    expected_values, expected = gradients(uncached, features, labels, seed=0)
    values, actual = gradients(cached, features, labels, seed=0)

    assert values == pytest.approx(expected_values, rel=1e-6)
    assert {"loss/L4-D32", "bin/L4-D32-B4", "cos/L4-D32", "sim/L4-D32-B1", "rel/L4-D32-B2"} <= set(values)
    for kind in ("model.0.", ".heads.", ".projection."):  # encoder, binarization heads, projection
        assert any(kind in name for name in expected), kind
    assert_same_gradients(expected, actual)
    for name, running in uncached.heads.state_dict().items():  # BatchNorm saw the same (whole) batch
        torch.testing.assert_close(cached.heads.state_dict()[name], running, msg=name)


def test_with_dropout_the_replay_draws_the_masks_of_the_first_pass(float64_model):
    """Dropout on: the cached gradients equal plain autograd through the same mini-batch forward passes under
    the same random stream, which holds only if step 3 replays each mini-batch's dropout masks."""
    float64_model.train()
    cached = full_recipe_loss(float64_model, MINI_BATCH)
    features, labels = batch(float64_model)
    selection = cached.selection.state_dict()
    values, actual = gradients(cached, features, labels, seed=7)

    cached.selection.load_state_dict(selection)
    cached.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    cells = cached.selection.cells_for_step()
    layers = sorted({cell.layers for cell in cells})
    per_column = []
    for column in features:
        parts = [
            layer_embeddings(float64_model, _create_minibatch(column, begin, end), layers)
            for begin, end in _minibatch_ranges(column, MINI_BATCH)
        ]
        per_column.append({layer: torch.cat([part[layer] for part in parts]) for layer in layers})
    components = cached.terms_loss(per_column, cells, labels)
    torch.stack(list(components.values())).sum().backward()
    expected = {name: p.grad.clone() for name, p in cached.named_parameters() if p.grad is not None}

    assert values == pytest.approx({name: value.item() for name, value in components.items()}, rel=1e-6)
    assert_same_gradients(expected, actual)
    cached.selection.load_state_dict(selection)
    _, other_masks = gradients(cached, features, labels, seed=8)
    assert not torch.allclose(
        other_masks["model.0.model.embeddings.word_embeddings.weight"],
        actual["model.0.model.embeddings.word_embeddings.weight"],
    ), "dropout is not active: the test would pass without replaying the masks"


def test_2dmse_samples_once_per_step_and_a_batch_within_one_mini_batch_is_not_cached(float64_model):
    loss = full_recipe_loss(float64_model, MINI_BATCH)
    reference = copy.deepcopy(loss.selection)
    features, labels = batch(float64_model)
    components = loss([dict(f) for f in features], labels)
    expected_cells = reference.cells_for_step()
    assert {name.split("/")[1] for name in components if name.startswith("loss/")} == {c.name2d for c in expected_cells}
    assert loss.selection.state_dict() == reference.state_dict()  # one draw for the step, not one per mini-batch

    calls = []
    float64_model[0].register_forward_hook(lambda *_: calls.append(1))
    loss.mini_batch_size = BATCH
    loss([dict(f) for f in features], labels)
    assert len(calls) == 3  # one forward pass per column, as without caching
    calls.clear()
    loss.mini_batch_size = MINI_BATCH
    sum(loss([dict(f) for f in features], labels).values()).backward()
    assert len(calls) == 2 * 3 * 3  # three mini-batches per column, embedded twice
