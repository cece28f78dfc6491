"""Decoder-LLM students: last-token pooling with left padding and EOS, prompts, LoRA, gradient checkpointing.

The student is a randomly initialised Qwen3-style base LLM (4 layers, hidden 64, byte-level tokenizer, no
sentence-transformers files) built by ``tools/tiny_decoder.py`` in the test; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

from tests.conftest import REPO
from tools.tiny_decoder import build_tiny_decoder
from trainer.cell_vectors import cell_vector, encode_layers, final_norm, layer_embeddings
from trainer.cli import main as cli
from trainer.decoder import QUERY_PROMPT, column_prompts, needs_decoder_modules
from trainer.errors import UserError
from trainer.grid import Cell, CellSelection, Grid
from trainer.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, has_lora, merge_lora
from trainer.serve.model import load
from trainer.serve.publish import publish
from trainer.train.losses import ElasticLoss, InfoNCELoss, Matryoshka2dLoss
from trainer.train.recipe import ModelConfig, load_recipe, parse_recipe
from trainer.train.run import train
from trainer.train.student import load_model
from trainer.train.teacher import load_teacher
from trainer.train.wise_ft import wise_ft_checkpoint

TEXTS = ["lift of a wing", "boundary layer transition at high speed over a flat plate", "heat", "shock tubes"]
SHORT_PROMPTS = {"query": "Query: ", "document": ""}


@pytest.fixture(scope="module")
def decoder_path(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder") / "base")


@pytest.fixture(scope="module")
def embedder_path(decoder_path, tmp_path_factory):
    """The tiny decoder as a last-token sentence-transformers model, saved."""
    folder = tmp_path_factory.mktemp("tiny-embedder") / "st"
    load_model(ModelConfig(str(decoder_path), max_seq_length=32)).save(str(folder))
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"anchor": f"what about topic {i}?", "positive": f"topic {i} is about item {i % 5}"} for i in range(64)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_dict(decoder_path, pairs, out, **training) -> dict:
    return {
        "model": {
            "name": str(decoder_path),
            "max_seq_length": 48,
            "prompts": SHORT_PROMPTS,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        },
        "data": {"train": [{"path": str(pairs)}]},
        "loss": {"type": "starbucks", "cells": ["L2-D32", "L4-D64"]},
        "binary": {"bits": [1], "hidden": 32},
        "training": {
            "output_dir": str(out),
            "max_steps": 2,
            "per_device_train_batch_size": 8,
            "learning_rate": 5e-3,
            "save_steps": 1,
            "logging_steps": 1,
            "report_to": "none",
            "seed": 1,
            **training,
        },
    }


@pytest.fixture(scope="module")
def trained(decoder_path, pairs, tmp_path_factory):
    """A LoRA run of 2 steps with every term (2D cells, 1-bit heads, distillation from the starting weights) and
    activation checkpointing; its output folder holds adapters, heads, manifest."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    raw = recipe_dict(decoder_path, pairs, out, activation_checkpointing=True)
    raw["distill"] = {"teacher": "self", "cache_dir": str(out.parent / "teacher-cache")}
    trainer = train(parse_recipe(raw))
    return trainer, out


def test_a_plain_decoder_llm_becomes_a_last_token_embedder(decoder_path, tmp_path):
    config = ModelConfig(str(decoder_path), max_seq_length=24)
    assert needs_decoder_modules(config)
    model = load_model(config)
    assert isinstance(model[0], Transformer) and isinstance(model[2], Normalize)
    assert model[1].pooling_mode == "lasttoken" and model.prompts["query"] == QUERY_PROMPT
    eos = model.tokenizer.eos_token_id
    batch = model.tokenizer(["ab", "abcd", "x" * 100], padding=True, truncation=True, max_length=24)
    assert [row[-1] for row in batch["input_ids"]] == [eos] * 3  # EOS appended, also to a truncated text
    assert batch["attention_mask"][0] == [0] * 21 + [1] * 3  # "ab" + EOS, padded on the left
    model.save(str(tmp_path / "st"))
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")  # a plain load reads texts the same way
    reread = reloaded.tokenizer(["ab", "abcd"], padding=True)
    assert reread["input_ids"] == [[eos, eos, 64, 65, eos], [64, 65, 66, 67, eos]]
    assert reread["attention_mask"] == [[0, 0, 1, 1, 1], [1] * 5]
    alone = reloaded.encode(TEXTS[:1], convert_to_tensor=True)
    padded = reloaded.encode(TEXTS, convert_to_tensor=True)[:1]  # the batch pads the first text on the left
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)
    with torch.no_grad():
        features = reloaded.tokenizer(TEXTS[:1], return_tensors="pt")
        last = reloaded[0].auto_model(**features).last_hidden_state[:, -1]  # the EOS token's final state
    torch.testing.assert_close(alone, torch.nn.functional.normalize(last, dim=-1), atol=1e-5, rtol=0)


def test_a_decoder_with_its_own_sentence_transformers_config_is_used_as_is(decoder_path, tmp_path):
    """Qwen3-Embedding-like: its own modules, tokenizer settings and prompts; the recipe adds prompts."""
    settings = {"padding_side": "left", "pad_token": "<|endoftext|>"}
    transformer = Transformer(str(decoder_path), processor_kwargs=settings)
    prompts = {"query": "Instruct: find the passage\nQuery:", "document": ""}
    own = SentenceTransformer(modules=[transformer, Pooling(64, "lasttoken"), Normalize()], prompts=prompts)
    own.save(str(tmp_path / "own"))
    config = ModelConfig(str(tmp_path / "own"), prompts={"nli": "Instruct: retrieve entailed text\nQuery: "})
    assert not needs_decoder_modules(config)
    model = load_model(config)
    assert model.prompts == {**prompts, "nli": "Instruct: retrieve entailed text\nQuery: "}
    assert model.tokenizer("ab")["input_ids"] == [64, 65]  # its tokenizer as it is: no EOS added


def test_a_plain_decoder_teacher_is_a_last_token_embedder(decoder_path, embedder_path):
    """The ``self`` teacher of a decoder student embeds texts as the student does at the start."""
    teacher = load_teacher(str(decoder_path), max_seq_length=32)
    student = SentenceTransformer(str(embedder_path), device="cpu")
    assert teacher[1].pooling_mode == "lasttoken"
    np.testing.assert_allclose(teacher.encode(TEXTS), student.encode(TEXTS), atol=1e-5)


def test_training_columns_get_the_query_and_document_prompts(decoder_path):
    model = SentenceTransformer(device="cpu", modules=[Transformer(str(decoder_path)), Pooling(64, "lasttoken")])
    model.prompts = {"query": "Query: ", "document": "Passage: "}
    columns = ["anchor", "positive", "negative", "negative_2"]
    assert column_prompts(model, columns) == {
        "anchor": "Query: ",
        "positive": "Passage: ",
        "negative": "Passage: ",
        "negative_2": "Passage: ",
    }
    model.prompts = {"query": "Query: ", "document": ""}
    assert column_prompts(model, columns) == {"anchor": "Query: "}
    model.prompts = {}
    assert column_prompts(model, ["text"]) == {}


def test_pre_norm_exits_and_early_exit_agree_in_any_order(embedder_path):
    """The final norm applies at every exit, and serving a cell first (early exit) does not change later passes."""
    model = SentenceTransformer(str(embedder_path), device="cpu")
    assert final_norm(model) is model[0].auto_model.norm
    served = load(embedder_path).at("L2-D64")
    first = served.encode(TEXTS)  # the first forward pass of that model runs only 2 blocks
    same = served.elastic.model
    with torch.no_grad():
        cut = cell_vector(layer_embeddings(same, same.preprocess(TEXTS), [1, 2]), Cell(2, 64))
    np.testing.assert_allclose(cut.numpy(), first, atol=1e-5)
    np.testing.assert_allclose(cell_vector(encode_layers(model, TEXTS, [2, 3]), Cell(2, 64)).numpy(), first, atol=1e-5)


def elastic_loss_and_grads(decoder_path, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    config = ModelConfig(str(decoder_path), max_seq_length=32, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    torch.manual_seed(0)
    model = load_model(config)
    with torch.no_grad():  # adapters away from their zero start, so that their gradients are not trivial
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    if checkpointing:
        model[0].auto_model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    calls, mlp = [0], model[0].auto_model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):  # (module hooks do not run in checkpointing's recomputation)
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    selection = CellSelection(Grid.from_spec(cells=[Cell(2, 32)]), Cell(4, 64), "starbucks")
    loss = ElasticLoss(model, selection, {"matryoshka": Matryoshka2dLoss(InfoNCELoss())})
    features = [model.preprocess([f"query {i}" for i in range(4)]), model.preprocess([f"doc {i}" for i in range(4)])]
    value = sum(loss([dict(f) for f in features], None).values())
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return value.item(), grads, calls[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(decoder_path):
    plain_loss, plain_grads, plain_calls = elastic_loss_and_grads(decoder_path, checkpointing=False)
    loss, grads, calls = elastic_loss_and_grads(decoder_path, checkpointing=True)
    assert (plain_calls, calls) == (2, 4), "checkpointing recomputes each block in the backward pass"
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(grad.abs().sum() > 0 for grad in grads.values())


def test_lora_training_trains_adapters_only_and_checkpoints_them(trained, decoder_path):
    trainer, out = trained
    logged = {name for entry in trainer.state.log_history for name in entry}
    assert {"loss/L2-D32", "bin/L2-D32-B1", "cos/L4-D64", "sim/L2-D32", "rel/L2-D32-B1"} <= logged
    assert trainer.args.activation_checkpointing and trainer.model[0].auto_model.is_activation_checkpointing
    assert trainer.args.prompts == {"anchor": "Query: "}  # the model's query prompt, documents have none
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert (folder / ADAPTER_WEIGHTS).is_file() and not (folder / "model.safetensors").exists()
        assert (folder / "binary_heads").is_dir()
    base = SentenceTransformer(str(decoder_path), device="cpu")[0].auto_model.state_dict()
    trained_model = trainer.model[0].auto_model
    for name, tensor in trained_model.state_dict().items():
        if "lora_" not in name:  # base weights: unchanged
            torch.testing.assert_close(tensor, base[name.replace(".base_layer", "")], atol=0, rtol=0, msg=name)
    with safe_open(str(out / ADAPTER_WEIGHTS), "pt") as handle:
        saved = {name: handle.get_tensor(name) for name in handle.keys()}
    assert saved and all("lora_" in name for name in saved)
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in saved.items())


def test_an_adapter_checkpoint_serves_cells_and_merges_into_plain_weights(trained, tmp_path):
    _, out = trained
    elastic = load(out)
    assert has_lora(elastic.model)
    served = elastic.at("L2-D32").encode_query(TEXTS)
    codes = elastic.at("L2-D32-B1").encode_document(TEXTS)
    merge_lora(elastic.model)
    assert not has_lora(elastic.model) and "lora" not in str(elastic.model)
    np.testing.assert_allclose(elastic.at("L2-D32").encode_query(TEXTS), served, atol=1e-5)
    elastic.model.save(str(tmp_path / "merged"))
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert "layers.0.self_attn.q_proj.weight" in names and not any("lora" in n or "base_" in n for n in names)
    np.testing.assert_allclose(load(tmp_path / "merged").at("L2-D32").encode_query(TEXTS), served, atol=1e-5)
    np.testing.assert_array_equal(elastic.at("L2-D32-B1").encode_document(TEXTS).packed, codes.packed)


def test_wise_ft_of_an_adapter_checkpoint_scales_its_merged_update(trained, decoder_path, tmp_path):
    _, out = trained
    merged = load(out).model
    merge_lora(merged)
    start = load_model(ModelConfig(name=str(decoder_path))).state_dict()
    result = wise_ft_checkpoint(out, 0.5, tmp_path / "wise")
    assert not (result / ADAPTER_CONFIG).exists() and (result / "binary_heads" / "config.json").is_file()
    weights = load(result).model.state_dict()
    assert set(weights) == set(start) and any(not torch.equal(merged.state_dict()[n], start[n]) for n in start)
    for name, value in weights.items():
        expected = start[name] + 0.5 * (merged.state_dict()[name] - start[name])
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_publishing_an_adapter_checkpoint_uploads_merged_weights(trained, tmp_path):
    _, out = trained
    files = publish(out, "me/tiny-decoder", dry_run=tmp_path / "staged")
    assert "model.safetensors" in files and "config.json" in files and "binary_heads/config.json" in files
    assert ADAPTER_CONFIG not in files and ADAPTER_WEIGHTS not in files
    staged = SentenceTransformer(str(tmp_path / "staged"), device="cpu")
    expected = SentenceTransformer(str(out), device="cpu").encode_query(TEXTS)
    np.testing.assert_allclose(staged.encode_query(TEXTS), expected, atol=1e-5)


def test_an_adapter_checkpoint_without_its_base_model_is_one_clear_error(trained, tmp_path, capsys):
    _, out = trained
    moved = tmp_path / "ckpt"
    shutil.copytree(out, moved)
    config = json.loads((moved / ADAPTER_CONFIG).read_text())
    (moved / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(SystemExit) as exit_info:
        cli(["export", str(moved), "--cell", "L2-D32", "--out", str(tmp_path / "export")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "need their base model" in error and "gone" in error
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(lora={"r": 0}), r"model.lora.r: 0 is not valid"),
        (lambda m: m.update(lora={"rank": 4}), r"model.lora.rank: unknown key"),
        (lambda m: m.update(lora={"dropout": 1.5}), r"model.lora.dropout: 1.5 is not valid"),
        (lambda m: m.update(lora={"target_modules": []}), r"model.lora.target_modules: \[\] is not valid"),
        (lambda m: m.update(lora="yes"), r"model.lora: 'yes' is not valid; expected a mapping of settings \(r, alpha"),
        (lambda m: m.update(prompts=["Query: "]), r"model.prompts: \['Query: '\] is not valid"),
    ],
)
def test_bad_decoder_settings_are_refused_before_loading(decoder_path, pairs, tmp_path, edit, message):
    raw = recipe_dict(decoder_path, pairs, tmp_path / "run")
    edit(raw["model"])
    with pytest.raises(UserError, match=message):
        parse_recipe(raw)


def test_lora_with_head_only_binarization_is_refused(decoder_path, pairs, tmp_path):
    raw = recipe_dict(decoder_path, pairs, tmp_path / "run")
    raw["binary"]["mode"] = "head-only"
    with pytest.raises(UserError, match="model.lora: binary.mode head-only keeps the encoder frozen"):
        parse_recipe(raw)


def test_the_ci_recipe_and_the_gpu_recipe_parse(decoder_path):
    ci = load_recipe(REPO / "configs" / "tiny-decoder-ci.yaml", ["--model.name", str(decoder_path)])
    assert ci.model.lora.r == 8 and ci.binary.bits == [1] and ci.training["activation_checkpointing"] is True
    raw = yaml.safe_load((REPO / "configs" / "qwen3-embedding-elastic.yaml").read_text())
    assert raw["model"]["lora"] and raw["training"]["bf16"] is True and raw["distill"]["teacher"]
