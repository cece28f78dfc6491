"""Recurrent binarization heads: STE, nesting, exact code scores, persistence, losses and refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.binary.codes import code_scores, inner_products, sign_codes
from trainer.binary.heads import BinaryHeads, planes_from_floats, sign_ste
from trainer.cell_vectors import cell_codes, layer_codes
from trainer.errors import UserError
from trainer.grid import Cell, Grid
from trainer.train.head_only import fit_heads, train_heads_only
from trainer.train.losses.binary import BinaryCodeLoss, EmbeddingToEmbeddingLoss
from trainer.train.losses.elastic import CellBatch
from trainer.train.losses.infonce import InfoNCELoss
from trainer.train.recipe import BinaryConfig


def unit(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def trained_like_heads(dims=(16, 32), bits=(1, 2, 4), **kwargs) -> BinaryHeads:
    """Heads with non-trivial BatchNorm statistics (a few training-mode passes), in eval mode."""
    torch.manual_seed(0)
    heads = BinaryHeads(dims, bits, hidden=24, **kwargs)
    with torch.no_grad():
        for module in heads.modules():  # move every block off its zero start, as training would
            if isinstance(module, torch.nn.Sequential):
                torch.nn.init.normal_(module[-1].weight, std=0.3)
        for dim in heads.dims:
            for layer in heads.layers or (1,):
                heads.encode_float(unit(64, dim, seed=dim), Cell(layer, dim))
    return heads.eval()


def test_sign_ste_forward_and_gradient():
    z = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 1.5], requires_grad=True)
    out = sign_ste(z)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0]))
    upstream = torch.arange(1.0, 8.0)
    (out * upstream).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]))


def test_gradients_reach_every_block_through_the_residual_steps():
    heads = BinaryHeads([16], [1, 3], hidden=24)
    x = unit(32, 16).requires_grad_()
    floats = heads.encode_float(x, Cell(2, 16))
    assert len(floats) == 3
    (floats[-1] * unit(32, 16, seed=1)).sum().backward()
    head = heads.head_for(Cell(2, 16))
    for block in [head.encoder, *head.decoders, *head.residuals]:  # each block's output layer starts at zero
        assert block[-1].weight.grad is not None and block[-1].weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_heads_without_blocks_are_the_untrained_heads_at_no_cost():
    x = unit(40, 16, seed=5)
    plain, untrained = BinaryHeads.parameter_free([16], [1, 2, 4]), BinaryHeads([16], [1, 2, 4], hidden=24).eval()
    assert sum(p.numel() for p in plain.parameters()) == 0
    for bits in (1, 2, 4):
        cell = Cell(2, 16, bits)
        np.testing.assert_array_equal(plain.encode(x, cell).packed, untrained.encode(x, cell).packed)


def test_cells_without_heads_encode_as_the_parameter_free_heads_in_blocks_and_from_layers(monkeypatch):
    """``cell_codes`` without heads (its 1-bit shortcut packs sign bits) and ``layer_codes`` of float16 and
    float32 layers are the parameter-free heads' codes; encoding in row blocks changes nothing."""
    import trainer.binary.heads

    layer = torch.from_numpy(np.random.default_rng(3).normal(size=(300, 48)).astype(np.float16))
    for bits in (1, 2, 4):
        cell = Cell(2, 32, bits)
        unit_prefix = torch.nn.functional.normalize(layer[:, :32].float(), dim=-1)
        expected = BinaryHeads.parameter_free([32], list(range(1, bits + 1))).encode(unit_prefix, cell)
        monkeypatch.setattr(trainer.binary.heads, "ENCODE_ROWS", 7)
        blocked = BinaryHeads.parameter_free([32], list(range(1, bits + 1))).encode(unit_prefix, cell)
        monkeypatch.undo()
        for codes in (blocked, cell_codes(unit_prefix, cell, None), layer_codes(layer, cell, None)):
            np.testing.assert_array_equal(codes.packed, expected.packed)
            np.testing.assert_array_equal(codes.norms, expected.norms)
        np.testing.assert_array_equal(layer_codes(layer.float(), cell, None).packed, expected.packed)
    with pytest.raises(UserError, match="needs embeddings of 32 dims"):
        cell_codes(layer[:, :40].float(), Cell(2, 32, 1), None)


def test_untrained_heads_are_the_residual_sign_quantiser():
    """At initialisation: 1 bit = sign bits; plane k = sign of the residual after steps 2^-i / sqrt(d)."""
    x = unit(50, 16, seed=4)
    codes = BinaryHeads([16], [1, 2, 3], hidden=24).encode(x, Cell(3, 16, 3))
    np.testing.assert_array_equal(codes.at_depth(1).packed, sign_codes(x.numpy()).packed)
    planes, estimate = codes.unpack(), torch.zeros_like(x)
    for k in range(3):
        if k:
            np.testing.assert_array_equal(planes[:, k], (x - estimate / 4**0.5 / 2).numpy() > 0)
        estimate = estimate + 2.0**-k * torch.from_numpy(np.where(planes[:, k], 1.0, -1.0)).float()


def test_float_forms_are_nested_codes():
    heads = trained_like_heads()
    cell = Cell(3, 32)
    floats = heads.encode_float(unit(20, 32, seed=2), cell)
    for k, form in enumerate(floats):
        levels = 2 ** (k + 1)  # k + 1 planes take 2^(k+1) distinct values per coordinate
        assert len(torch.unique(form)) <= levels
        if k:
            step = (form - floats[k - 1]) * 2**k
            torch.testing.assert_close(step.abs(), torch.ones_like(step))


def test_depth_k_code_is_a_prefix_of_depth_k_plus_1():
    heads = trained_like_heads()
    x = unit(20, 32, seed=3)
    one, two, four = (heads.encode(x, Cell(6, 32, b)) for b in (1, 2, 4))
    assert (one.bits, two.bits, four.bits) == (1, 2, 4)
    np.testing.assert_array_equal(two.unpack()[:, :1], one.unpack())
    np.testing.assert_array_equal(four.unpack()[:, :2], two.unpack())
    np.testing.assert_array_equal(four.at_depth(2).packed, two.packed)


def test_packed_codes_are_exactly_the_float_forms():
    heads = trained_like_heads()
    cell = Cell(6, 32, 4)
    x = unit(20, 32, seed=4)
    codes = heads.encode(x, cell)
    floats = heads.encode_float(x, cell)[3].detach()
    np.testing.assert_array_equal(codes.to_float(), floats.double().numpy())
    np.testing.assert_array_equal(planes_from_floats(heads.encode_float(x, cell)).detach().numpy(), codes.unpack())


def test_popcount_and_float_scores_of_learned_codes_agree():
    heads = trained_like_heads()
    cell = Cell(6, 32, 2)
    queries, docs = heads.encode(unit(7, 32, seed=5), cell), heads.encode(unit(30, 32, seed=6), cell)
    reconstructed = queries.to_float() @ docs.to_float().T
    np.testing.assert_array_equal(inner_products(queries, docs), reconstructed)
    cosine = code_scores(queries, docs)
    expected = (
        F.normalize(torch.from_numpy(queries.to_float()), dim=-1)
        @ F.normalize(torch.from_numpy(docs.to_float()), dim=-1).T
    )
    np.testing.assert_allclose(cosine, expected.numpy(), rtol=1e-6, atol=1e-12)
    # same ranking: the float path's scores, read in the popcount path's order, never increase (ties aside)
    order = np.argsort(-cosine, axis=1)
    assert np.all(np.diff(np.take_along_axis(expected.numpy(), order, axis=1), axis=1) <= 1e-12)


def test_encode_uses_running_statistics_and_restores_the_mode():
    heads = trained_like_heads()
    heads.train()
    x = unit(10, 16, seed=7)
    alone = heads.encode(x[:1], Cell(1, 16, 1))
    together = heads.encode(x, Cell(1, 16, 1))
    np.testing.assert_array_equal(alone.packed, together.packed[:1])  # batch-independent: eval BatchNorm
    assert heads.training


def test_dim_sharing_shares_heads_across_layers_and_cell_sharing_does_not():
    shared = trained_like_heads()
    assert shared.head_for(Cell(2, 16)) is shared.head_for(Cell(6, 16))
    assert shared.head_for(Cell(2, 16)) is not shared.head_for(Cell(2, 32))
    per_cell = trained_like_heads(sharing="cell", layers=(2, 6))
    assert per_cell.head_for(Cell(2, 16)) is not per_cell.head_for(Cell(6, 16))
    with pytest.raises(UserError, match="L4-D16 has no binary head"):
        per_cell.head_for(Cell(4, 16))


def test_invalid_requests_are_refused():
    heads = trained_like_heads()
    x = unit(4, 16)
    with pytest.raises(UserError, match=r"bits=3 was not trained: these heads serve depths \[1, 2, 4\]"):
        heads.encode(x, Cell(1, 16, 3))
    with pytest.raises(UserError, match="not trained"):
        heads.check_depth(0)
    with pytest.raises(UserError, match="L1-D64 has no binary head"):
        heads.encode(unit(4, 64), Cell(1, 64, 1))
    with pytest.raises(UserError, match="needs embeddings of 16 dims"):
        heads.encode_float(unit(4, 32), Cell(1, 16))
    with pytest.raises(UserError, match="multiple of 8"):
        BinaryHeads([12], [1])
    with pytest.raises(UserError, match="not a code depth"):
        BinaryHeads([16], [0, 1])
    with pytest.raises(UserError, match="32 means float"):
        BinaryHeads([16], [1, 32])


def test_save_and_load_round_trip(tmp_path):
    heads = trained_like_heads()
    assert BinaryHeads.load(tmp_path) is None
    folder = heads.save(tmp_path)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = BinaryHeads.load(tmp_path)
    assert loaded is not None and loaded.bits == (1, 2, 4) and not loaded.training
    x = unit(12, 32, seed=8)
    for bits in loaded.bits:
        np.testing.assert_array_equal(
            loaded.encode(x, Cell(5, 32, bits)).packed, heads.encode(x, Cell(5, 32, bits)).packed
        )
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot load the binarization heads"):
        BinaryHeads.load(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bits": [2, 1]}, "binary.bits: .* strictly increasing"),
        ({"bits": []}, "binary.bits: .* non-empty"),
        ({"bits": [1, 17]}, "binary.bits: 17 is not a code depth"),
        ({"sharing": "layer"}, "binary.sharing: 'layer' .* \\['dim', 'cell'\\]"),
        ({"mode": "frozen"}, "binary.mode: 'frozen'"),
        ({"hidden": -1}, "binary.hidden: -1"),
        ({"hidden": 0, "mode": "head-only"}, "binary.hidden: 0 .* head-only"),
        ({"batch_size": 1}, "binary.batch_size: 1"),
        ({"scale": 0}, "binary.scale: 0"),
        ({"kl_weight": -1}, "binary.kl_weight: -1"),
        ({"bit_weights": [2, 1]}, "binary.bit_weights: \\[2, 1\\] .* one number >= 0 per depth of binary.bits"),
        ({"bit_weights": [0, 0, 0]}, "binary.bit_weights: \\[0, 0, 0\\] .*not all 0"),
        ({"bit_weights": [1, -1, 1]}, "binary.bit_weights: \\[1, -1, 1\\]"),
        ({"bit_weights": 2}, "binary.bit_weights: 2 is not valid"),
    ],
)
def test_binary_config_errors_name_key_and_valid_values(overrides, message):
    with pytest.raises(UserError, match=message):
        BinaryConfig(**overrides)


def test_binary_config_refuses_unpackable_grid_dims():
    with pytest.raises(UserError, match="grid dim 20 cannot get binary codes"):
        BinaryConfig().check_dims([16, 20])


def make_batch(cells: list[Cell], heads: BinaryHeads, n: int = 8, columns: int = 3) -> CellBatch:
    width = max(cell.dim for cell in cells)
    raw = [{6: unit(n, width, seed=10 + c).requires_grad_()} for c in range(columns)]
    embeddings = {cell: [F.normalize(column[6][:, : cell.dim], dim=-1) for column in raw] for cell in cells}
    codes = heads.code_forms(embeddings, heads.bits)
    return CellBatch(embeddings=embeddings, layer_embeddings=raw, full=max(cells), labels=None, codes=codes)


def test_binary_code_loss_has_a_component_per_cell_and_depth_and_trains_encoder_and_heads():
    heads = BinaryHeads([16, 32], [1, 2], hidden=24)
    loss = BinaryCodeLoss(heads, [1, 2], InfoNCELoss(scale=20.0), weight=0.5, kl_weight=2.0)
    batch = make_batch([Cell(6, 16), Cell(6, 32)], heads)
    components = loss(batch)
    expected = {f"{kind}/L6-D{dim}-B{bits}" for kind in ("bin", "binkl") for dim in (16, 32) for bits in (1, 2)}
    assert set(components) == expected
    sum(components.values()).backward()
    assert batch.layer_embeddings[0][6].grad.abs().sum() > 0
    assert all(p.grad is not None for p in heads.parameters())
    no_kl = BinaryCodeLoss(heads, [1, 2], InfoNCELoss(), kl_weight=0.0)(batch)
    assert set(no_kl) == {name for name in expected if name.startswith("bin/")}


def test_binary_code_loss_weights_match_a_direct_computation():
    heads = BinaryHeads([16], [1], hidden=24).eval()
    infonce = InfoNCELoss(scale=10.0)
    batch = make_batch([Cell(6, 16)], heads, columns=2)
    components = BinaryCodeLoss(heads, [1], infonce, weight=0.5, kl_weight=2.0, kl_temperature=0.5)(batch)
    columns = batch.embeddings[Cell(6, 16)]
    codes = [F.normalize(heads.encode_float(c, Cell(6, 16))[0], dim=-1) for c in columns]
    code_loss, code_scores = infonce(codes[0], codes[1:]), infonce.scores(codes[0], codes[1:])[0]
    float_scores, _ = infonce.scores(columns[0], columns[1:])
    kl = F.kl_div(F.log_softmax(code_scores / 0.5, -1), F.softmax(float_scores / 0.5, -1), reduction="batchmean")
    torch.testing.assert_close(components["bin/L6-D16-B1"], 0.5 * code_loss)
    torch.testing.assert_close(components["binkl/L6-D16-B1"], 2.0 * kl)


def test_binary_code_loss_bit_weights_set_each_depths_share_of_both_groups():
    heads = BinaryHeads([16, 32], [1, 2], hidden=0)
    batch = make_batch([Cell(6, 16), Cell(6, 32)], heads)
    equal = BinaryCodeLoss(heads, [1, 2], InfoNCELoss(), weight=0.5, kl_weight=2.0)(batch)
    weighted = BinaryCodeLoss(heads, [1, 2], InfoNCELoss(), weight=0.5, kl_weight=2.0, bit_weights=[3, 1])(batch)
    assert set(weighted) == set(equal)
    for name, value in equal.items():  # equal weights: each depth has half of a group; [3, 1]: 3/4 and 1/4
        factor = 1.5 if name.endswith("-B1") else 0.5
        torch.testing.assert_close(weighted[name], factor * value)
    with pytest.raises(UserError, match="bit_weights: \\[1\\] .* one number >= 0 per depth of bits \\[1, 2\\]"):
        BinaryCodeLoss(heads, [1, 2], InfoNCELoss(), bit_weights=[1])


def test_binary_code_loss_refuses_untrained_depths_and_saves_its_heads(tmp_path):
    heads = BinaryHeads([16], [1, 2], hidden=24)
    with pytest.raises(UserError, match="bits=4 was not trained"):
        BinaryCodeLoss(heads, [1, 4], InfoNCELoss())
    loss = BinaryCodeLoss(heads, [1, 2], InfoNCELoss())
    loss.save_pretrained(tmp_path)
    with torch.no_grad():
        next(heads.parameters()).add_(1.0)
    before = next(heads.parameters()).clone()
    loss.load_state(tmp_path)
    torch.testing.assert_close(next(heads.parameters()), before - 1.0)


def test_embedding_to_embedding_loss_components():
    heads = BinaryHeads([16], [1, 2], hidden=24)
    cell = Cell(6, 16)
    items, anchors, positives = unit(8, 16, 1), unit(8, 16, 2), unit(8, 16, 3)
    components = EmbeddingToEmbeddingLoss(heads, [1, 2])({cell: items}, {cell: (anchors, positives)})
    assert set(components) == {f"{k}/L6-D16-B{b}" for k in ("e2e", "e2ekl", "e2epair") for b in (1, 2)}
    assert all(torch.isfinite(v) and v >= 0 for v in components.values())


def test_fit_heads_learns_codes_that_preserve_neighbours():
    """Clustered data: after training, a code's nearest code lies in its own cluster far more often."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(16, 32, generator=generator), dim=-1)
    labels = torch.arange(512) % 16
    x = F.normalize(centres[labels] + 0.25 * torch.randn(512, 32, generator=generator), dim=-1)
    grid = Grid((Cell(2, 32),), (1,))
    config = BinaryConfig(bits=[1], hidden=64, mode="head-only", steps=150, batch_size=128, lr=3e-3)

    def neighbour_accuracy(heads: BinaryHeads) -> float:
        codes = heads.encode(x, Cell(2, 32, 1))
        scores = code_scores(codes, codes)
        np.fill_diagonal(scores, -np.inf)
        return float((labels[scores.argmax(1)] == labels).float().mean())

    torch.manual_seed(config.seed)
    untrained = BinaryHeads([32], [1], hidden=64, layers=(2,)).eval()
    trained = fit_heads({2: x}, grid, config)
    assert neighbour_accuracy(trained) > neighbour_accuracy(untrained) + 0.1  # untrained: sign bits


def test_train_heads_only_caches_embeddings_and_saves_heads(tiny_model, tmp_path, monkeypatch):
    import trainer.cell_vectors

    texts = [f"sentence number {i} about topic {i % 3}" for i in range(24)]
    pairs = [(texts[0], texts[3]), (texts[1], "a new text only in pairs")]
    grid = Grid.from_spec(cells=["L2-D16", "L4-D32"], bits=[1, 2])
    config = BinaryConfig(bits=[1, 2], hidden=16, mode="head-only", steps=3, batch_size=8)
    heads = train_heads_only(tiny_model, texts, pairs, grid, config, tmp_path)
    assert heads.bits == (1, 2) and heads.dims == (16, 32)
    loaded = BinaryHeads.load(tmp_path)
    x = unit(5, 32)
    np.testing.assert_array_equal(loaded.encode(x, Cell(4, 32, 2)).packed, heads.encode(x, Cell(4, 32, 2)).packed)
    assert len(list((tmp_path / "binary_heads_cache").glob("layers-*/meta.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cached embeddings should have been reused")

    config.cache_dir = str(tmp_path / "binary_heads_cache")
    monkeypatch.setattr(trainer.cell_vectors, "encode_layers", fail)
    train_heads_only(tiny_model, texts, pairs, grid, config, tmp_path / "again")
    assert BinaryHeads.load(tmp_path / "again") is not None


def test_train_heads_only_refusals(tiny_model, tmp_path):
    grid = Grid.from_spec(cells=["L4-D32"], bits=[1, 2])
    with pytest.raises(UserError, match="binary.mode"):
        train_heads_only(tiny_model, ["a", "b"], None, grid, BinaryConfig(bits=[1, 2]), tmp_path)
    with pytest.raises(UserError, match="differ from the grid's code bits"):
        train_heads_only(tiny_model, ["a", "b"], None, grid, BinaryConfig(bits=[1], mode="head-only"), tmp_path)
    wide = Grid.from_spec(cells=["L4-D64"], bits=[1])
    with pytest.raises(UserError, match="64 dims"):
        train_heads_only(tiny_model, ["a", "b"], None, wide, BinaryConfig(bits=[1], mode="head-only"), tmp_path)


def test_head_only_training_writes_checkpoints_and_resumes_to_the_same_heads(tiny_model_path, tmp_path, monkeypatch):
    """A run stopped after checkpoint-20, while it was writing checkpoint-40, resumes with
    ``--resume_from_checkpoint true`` from checkpoint-20 and ends with the heads of an uninterrupted run."""
    import shutil

    from trainer.train.head_only import CHECKPOINT_STATE
    from trainer.train.recipe import parse_recipe
    from trainer.train.run import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"anchor": "question {i}", "positive": "answer {i} {i % 5}"}}\n' for i in range(40)))

    def run(out, **training):
        recipe = {
            "model": {"name": str(tiny_model_path)},
            "data": {"train": [{"path": str(pairs)}]},
            "loss": {"cells": ["L2-D16", "L4-D32"]},
            "binary": {"mode": "head-only", "bits": [1, 2], "hidden": 16, "steps": 60, "batch_size": 16},
            "training": {"output_dir": str(out), "save_steps": 20, **training},
        }
        train(parse_recipe(recipe))

    reference = tmp_path / "reference"
    run(reference)
    assert {p.name for p in reference.glob("checkpoint-*")} == {"checkpoint-20", "checkpoint-40", "checkpoint-60"}
    assert (reference / "checkpoint-20" / "binary_heads" / "model.safetensors").is_file()

    stopped = tmp_path / "stopped"
    shutil.copytree(reference, stopped, ignore=shutil.ignore_patterns("checkpoint-60", "binary_heads"))
    shutil.copytree(reference / "checkpoint-20" / "binary_heads", stopped / "checkpoint-20" / "binary_heads")
    (stopped / "checkpoint-40" / CHECKPOINT_STATE).unlink()  # killed while writing checkpoint-40
    steps = []
    forward = EmbeddingToEmbeddingLoss.forward
    monkeypatch.setattr(EmbeddingToEmbeddingLoss, "forward", lambda *a, **k: steps.append(1) or forward(*a, **k))
    run(stopped, resume_from_checkpoint=True)
    assert len(steps) == 40  # steps 21..60: it resumed from checkpoint-20

    expected, resumed = BinaryHeads.load(reference).state_dict(), BinaryHeads.load(stopped).state_dict()
    assert set(resumed) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    started = BinaryHeads.load(reference / "checkpoint-20").state_dict()
    assert any(not torch.equal(started[name], tensor) for name, tensor in expected.items())


def test_checkpointed_code_forms_equal_the_direct_forms_and_update_batch_norm_once():
    torch.manual_seed(0)
    heads = BinaryHeads([16], [1, 2, 4], hidden=24).double()
    for block in heads.modules():  # non-zero last layers, so that the blocks change the codes
        if isinstance(block, torch.nn.Sequential):
            torch.nn.init.normal_(block[-1].weight, std=0.3)
    reference = copy.deepcopy(heads)
    x = unit(40, 16, seed=1).double().requires_grad_()
    y = x.detach().clone().requires_grad_()
    codes = heads.code_forms({Cell(6, 16): [x]}, [1, 2, 4])
    direct = [F.normalize(f, dim=-1) for f in reference.encode_float(y, Cell(6, 16))]
    weights = [torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    total = sum((codes[Cell(6, 16, bits)][0] * w).sum() for bits, w in zip([1, 2, 4], weights, strict=True))
    expected = sum((direct[bits - 1] * w).sum() for bits, w in zip([1, 2, 4], weights, strict=True))
    total.backward()
    expected.backward()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(x.grad, y.grad)
    for (name, got), (_, want) in zip(heads.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, msg=name)
    for (name, got), (_, want) in zip(heads.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(got, want, msg=name)  # the recomputation did not update them again


def scrambled_heads(dims=(16,), bits=(1, 2)) -> BinaryHeads:
    """Heads whose blocks' last layers are large and random: codes that no longer follow the float signs."""
    torch.manual_seed(0)
    heads = BinaryHeads(list(dims), list(bits), hidden=8)
    for block in heads.modules():
        if isinstance(block, torch.nn.Sequential):
            torch.nn.init.normal_(block[-1].weight, std=3.0)
    return heads.eval()


def noisy_pairs(n: int = 120, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """2n items, item n + i a noisy copy of item i; the pairs (i, n + i)."""
    x = unit(n, dim, seed=4)
    copies = F.normalize(x + 0.3 * unit(n, dim, seed=5), dim=-1)
    return torch.cat([x, copies]), torch.tensor([(i, n + i) for i in range(n)])


def test_holdout_guard_resets_a_head_that_ranks_worse_than_the_parameter_free_codes_and_keeps_others():
    from trainer.train.holdout import guard_heads

    items, pairs = noisy_pairs()
    cell, grid = Cell(6, 16), Grid((Cell(6, 16),), (1, 2))
    heads, free = scrambled_heads(), BinaryHeads.parameter_free([16], [1, 2])
    before = heads.encode(items, cell.with_bits(2)).packed
    assert not np.array_equal(before, free.encode(items, cell.with_bits(2)).packed)
    report = guard_heads(heads, {6: items}, grid, held_pairs=pairs[:60])["D16"]
    assert not report[1]["kept"] and report[1]["learned"] < report[1]["parameter-free"]
    assert not report[2]["kept"]
    for bits in (1, 2):  # reset: exactly the parameter-free quantiser, whose 1 bit is the sign bits
        codes = heads.encode(items, cell.with_bits(bits)).packed
        np.testing.assert_array_equal(codes, free.encode(items, cell.with_bits(bits)).packed)
    np.testing.assert_array_equal(heads.encode(items, cell.with_bits(1)).packed, sign_codes(items.numpy()).packed)

    untrained = BinaryHeads([16], [1, 2], hidden=8).eval()  # equal to the parameter-free codes: kept
    report = guard_heads(untrained, {6: items}, grid, held_items=torch.arange(100))["D16"]
    assert report[1]["kept"] and report[2]["kept"]
    assert report[2]["learned"] == report[2]["parameter-free"]


def test_holdout_guard_keeps_good_lower_planes_when_it_resets_a_deeper_one():
    from trainer.train.holdout import guard_heads

    items, pairs = noisy_pairs()
    cell, grid = Cell(6, 16), Grid((Cell(6, 16),), (1, 2, 4))
    heads = scrambled_heads(bits=(1, 2, 4))
    heads.reset_depth("D16", 1)  # a 1-bit code equal to the sign bits, scrambled planes 2..4 on top
    report = guard_heads(heads, {6: items}, grid, held_pairs=pairs[:60])["D16"]
    assert report[1]["kept"] and not report[2]["kept"] and not report[4]["kept"]
    free = BinaryHeads.parameter_free([16], [1, 2, 4])
    np.testing.assert_array_equal(
        heads.encode(items, cell.with_bits(4)).packed, free.encode(items, cell.with_bits(4)).packed
    )


def test_fit_heads_trains_without_the_held_out_anchors_and_checks_the_heads_on_them(monkeypatch):
    import trainer.train.head_only as head_only

    items, pairs = noisy_pairs()
    seen, checked = [], {}

    def pair_cells(layers, pair_index, batch_size, grid):
        seen.append(pair_index)
        return None

    monkeypatch.setattr(head_only, "_pair_cells", pair_cells)
    monkeypatch.setattr(head_only, "guard_heads", lambda heads, *args: checked.update(held=args[2]))
    config = BinaryConfig(bits=[1], hidden=8, mode="head-only", steps=2, batch_size=16, holdout=0.25)
    fit_heads({6: items}, Grid((Cell(6, 16),), (1,)), config, pairs)
    held = checked["held"]
    assert len(held) == 30 and len(seen[0]) == 90
    assert not set(held[:, 0].tolist()) & set(seen[0][:, 0].tolist())  # no held-out anchor is trained on


@pytest.mark.parametrize("value", [-0.1, 0.5, 1, True, "0.1"])
def test_binary_holdout_must_be_a_share_below_one_half(value):
    with pytest.raises(UserError, match="binary.holdout"):
        BinaryConfig(mode="head-only", holdout=value)
