"""WiSE-FT (``wise_ft.alpha``): the saved encoder is the interpolation of the trained one and its start."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from tests.conftest import MINILM
from trainer.errors import UserError
from trainer.lora import add_lora, merge_lora
from trainer.manifest import MANIFEST_NAME
from trainer.serve.card import _citations
from trainer.serve.model import load
from trainer.train.recipe import load_recipe
from trainer.train.run import train_from_recipe
from trainer.train.wise_ft import interpolate_with_base, wise_ft_checkpoint

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["query", "value"]}


def _moved(model: SentenceTransformer, seed: int) -> SentenceTransformer:
    """A copy of ``model`` with every weight moved by random noise, as training would."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    return moved


def test_every_weight_becomes_alpha_tuned_plus_the_rest_base(tiny_model):
    tuned = _moved(tiny_model, seed=1)
    before = {name: value.clone() for name, value in tuned.state_dict().items()}
    interpolate_with_base(tuned, tiny_model, alpha=0.3)
    base = tiny_model.state_dict()
    for name, value in tuned.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.3 * before[name] + 0.7 * base[name], msg=name)
        else:
            assert torch.equal(value, before[name]), name


def test_alpha_one_keeps_the_trained_weights(tiny_model):
    tuned = _moved(tiny_model, seed=2)
    before = {name: value.clone() for name, value in tuned.state_dict().items()}
    interpolate_with_base(tuned, tiny_model, alpha=1.0)
    for name, value in tuned.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_lora_interpolation_is_the_interpolation_of_the_merged_weights(tiny_model_path):
    base = SentenceTransformer(str(tiny_model_path), device="cpu")
    add_lora(base, **LORA)
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # training moves both factors; B starts at zero
        for name, parameter in tuned.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    fresh = SentenceTransformer(str(tiny_model_path), device="cpu")
    torch.manual_seed(99)  # a base whose adapters start elsewhere: only B's zero start may matter
    add_lora(fresh, **LORA)
    merged_tuned = copy.deepcopy(tuned)
    merge_lora(merged_tuned)
    interpolate_with_base(tuned, fresh, alpha=0.4)
    frozen = {n: v for n, v in fresh.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(tuned.state_dict()[n], v) for n, v in frozen.items())  # bit for bit
    merge_lora(tuned)
    plain = SentenceTransformer(str(tiny_model_path), device="cpu").state_dict()
    for name, value in tuned.state_dict().items():
        expected = plain[name] + 0.4 * (merged_tuned.state_dict()[name] - plain[name])
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(merged_tuned.state_dict()[n], plain[n]) for n in plain)


def test_a_base_without_the_weight_is_a_clear_error(tiny_model, tiny_model_path):
    tuned = SentenceTransformer(str(tiny_model_path), device="cpu")
    add_lora(tuned, **LORA)
    with pytest.raises(UserError, match="wise_ft: the base model has no weight .*base_layer"):
        interpolate_with_base(tuned, tiny_model, alpha=0.5)


def _recipe(tiny_model_path, tmp_path, out, alpha: float | None) -> str:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"anchor": "question {i}", "positive": "answer {i} {i % 7}"}}\n' for i in range(64)))
    raw = {
        "model": {"name": str(tiny_model_path)},
        "data": {"train": [{"path": str(pairs)}]},
        "loss": {"type": "grid", "layers": [2, 4], "dims": [16, 32]},
        "binary": {"bits": [1, 2], "hidden": 8},
        "training": {
            "output_dir": str(out),
            "max_steps": 4,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "report_to": "none",
            "seed": 7,
        },
    }
    if alpha is not None:
        raw["wise_ft"] = {"alpha": alpha}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    """The same 4-step run trained twice: as is, and with ``wise_ft.alpha: 0.25``."""
    tmp_path = tmp_path_factory.mktemp("wise-ft-runs")
    plain_out, merged_out = tmp_path / "plain", tmp_path / "merged"
    train_from_recipe(_recipe(tiny_model_path, tmp_path, plain_out, None))
    train_from_recipe(_recipe(tiny_model_path, tmp_path, merged_out, 0.25))
    return tmp_path, plain_out, merged_out


def test_a_trained_run_saves_the_interpolation_of_the_same_run_without_it(tiny_model_path, runs):
    tmp_path, plain_out, merged_out = runs
    trained = SentenceTransformer(str(plain_out), device="cpu").state_dict()
    merged = SentenceTransformer(str(merged_out), device="cpu").state_dict()
    base = SentenceTransformer(str(tiny_model_path), device="cpu").state_dict()
    assert any(not torch.equal(trained[name], base[name]) for name in base)
    for name, value in merged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.25 * trained[name] + 0.75 * base[name], atol=1e-6, rtol=1e-5)
    assert load_recipe(str(tmp_path / "merged.yaml")).wise_ft.alpha == 0.25


def test_only_the_process_that_saves_loads_the_base_to_merge(tiny_model_path, tmp_path, monkeypatch):
    """Under DDP every process trains, but only the one that writes the model needs the merged weights: the
    others must not load a second copy of the base model."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    import trainer.train.run as run

    merges = []
    monkeypatch.setattr(run, "interpolate_with_base", lambda *args: merges.append(args))
    monkeypatch.setattr(SentenceTransformerTrainingArguments, "should_save", property(lambda self: False))
    train_from_recipe(_recipe(tiny_model_path, tmp_path, tmp_path / "other-rank", 0.25))
    assert merges == []
    monkeypatch.undo()
    monkeypatch.setattr(run, "interpolate_with_base", lambda *args: merges.append(args))
    train_from_recipe(_recipe(tiny_model_path, tmp_path, tmp_path / "main-rank", 0.25))
    assert len(merges) == 1 and merges[0][2] == 0.25


def test_the_model_card_cites_wise_ft_only_when_the_recipe_merged():
    merged = _citations({"recipe": {"wise_ft": {"alpha": 0.85}}})
    plain = _citations({"recipe": {"wise_ft": None}})
    assert "Robust fine-tuning of zero-shot models" in merged and "Sentence-BERT" in merged
    assert "Robust fine-tuning" not in plain and "Sentence-BERT" in plain


def test_wise_ft_after_training_writes_what_training_with_wise_ft_writes(runs, tmp_path):
    _, plain_out, merged_out = runs
    out = wise_ft_checkpoint(plain_out, 0.25, tmp_path / "after")
    after, during = load(out), load(merged_out)
    for name, value in during.model.state_dict().items():
        torch.testing.assert_close(after.model.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)
    for name, value in load(plain_out).heads.state_dict().items():  # the heads stay as trained
        assert torch.equal(after.heads.state_dict()[name], value), name
    assert after.manifest["recipe"]["wise_ft"] == {"alpha": 0.25} and after.manifest["wise_ft_of"] == str(plain_out)
    with pytest.raises(UserError, match="already merged"):
        wise_ft_checkpoint(out, 0.5, tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


def test_another_base_is_loaded_at_its_own_revision_not_the_recipes(tmp_path):
    """The recipe pins the revision of the model training started from; a --base naming another model must
    not inherit it (offline, a pinned revision MiniLM's cache does not hold would fail to load)."""
    checkpoint = tmp_path / "checkpoint"
    SentenceTransformer(MINILM, device="cpu").save(str(checkpoint))
    manifest = {"base_model": "acme/minilm-fork", "recipe": {"model": {"name": "acme/minilm-fork", "revision": "v9"}}}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    merged = load(wise_ft_checkpoint(checkpoint, 0.5, tmp_path / "merged", base=MINILM))
    weights = merged.model.state_dict()
    for name, value in SentenceTransformer(MINILM, device="cpu").state_dict().items():
        torch.testing.assert_close(weights[name], value, msg=name)  # the checkpoint is MiniLM itself
    assert merged.manifest["recipe"]["model"]["revision"] == "v9"  # the record of training is kept
