"""One definition of a cell: training, evaluation, ``load(...).at(cell)`` and an exported cell give the same vector.

Tiny randomly initialised models of five architectures (no download): post-norm encoders (BERT/MiniLM, MPNet),
a pre-norm encoder with a final norm (ModernBERT) and pre-norm decoders (Llama, Qwen3), each with trained-like
binarization heads. For several float and binary cells, the vector cut from one full forward pass (what the
losses see), the evaluation's encoding, the early-exit serving path and the exported standalone model agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaModel,
    ModernBertConfig,
    ModernBertModel,
    MPNetConfig,
    MPNetModel,
    Qwen3Config,
    Qwen3Model,
)

from tests.conftest import MINILM
from trainer.binary.heads import BinaryHeads, planes_from_floats
from trainer.cell_vectors import cell_codes, cell_vector, encode_layers, final_norm, keep_layers, layer_embeddings
from trainer.grid import Cell
from trainer.serve.export import export_cell
from trainer.serve.model import load

HIDDEN, LAYERS = 32, 3
TEXTS = [
    "lift of a wing in a slipstream",
    "boundary layer transition at high speed",
    "heat transfer",
    "shock tubes and the flow behind a moving shock wave in air",
]
CELLS = [Cell(1, 16), Cell(2, 32), Cell(3, 16), Cell(2, 16, 1), Cell(1, 32, 2), Cell(3, 32, 2)]
COMMON = dict(
    vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64
)
ARCHITECTURES = {
    "bert": (BertModel, BertConfig(**COMMON, max_position_embeddings=128), "mean", False),
    "mpnet": (MPNetModel, MPNetConfig(**COMMON, max_position_embeddings=130), "mean", False),
    "modernbert": (
        ModernBertModel,
        ModernBertConfig(
            **COMMON, pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102
        ),
        "mean",
        True,
    ),
    "llama": (LlamaModel, LlamaConfig(**COMMON, num_key_value_heads=1, max_position_embeddings=128), "lasttoken", True),
    "qwen3": (
        Qwen3Model,
        Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=16, max_position_embeddings=128),
        "mean",
        True,
    ),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    """A tiny sentence-transformers checkpoint of one architecture with binarization heads off their zero start."""
    model_class, config, pooling, has_final_norm = ARCHITECTURES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf_model = model_class(config)
    with torch.no_grad():  # norms that change directions, so that a missing or doubled final norm shows
        for name, parameter in hf_model.named_parameters():
            if "norm" in name.lower() and parameter.dim() == 1:
                parameter.normal_(1.0, 0.5)
    hf_model.save_pretrained(folder / "hf")
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder / "hf")
    transformer = Transformer(str(folder / "hf"), max_seq_length=32)
    SentenceTransformer(modules=[transformer, Pooling(HIDDEN, pooling), Normalize()]).save(str(folder / "ckpt"))
    heads = BinaryHeads(dims=[16, 32], bits=[1, 2], hidden=16)
    with torch.no_grad():
        for module in heads.modules():
            if isinstance(module, torch.nn.Sequential):
                torch.nn.init.normal_(module[-1].weight, std=0.3)
        for dim in (16, 32):  # BatchNorm running statistics
            heads.encode_float(torch.nn.functional.normalize(torch.randn(64, dim), dim=-1), Cell(1, dim))
    heads.eval().save(folder / "ckpt")
    return folder / "ckpt", has_final_norm


def float_form(vectors: torch.Tensor, cell: Cell, heads: BinaryHeads) -> np.ndarray:
    """A cell's output as the exported model gives it: the unit float vector, or the code's float form."""
    if cell.is_float:
        return vectors.numpy()
    return cell_codes(vectors, cell, heads).to_float()


def test_final_norm_is_found_exactly_for_pre_norm_models(checkpoint):
    path, has_final_norm = checkpoint
    assert (final_norm(SentenceTransformer(str(path))) is not None) == has_final_norm


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_training_evaluation_serving_and_export_agree(checkpoint, cell, tmp_path):
    path, _ = checkpoint
    model, heads = SentenceTransformer(str(path), device="cpu"), BinaryHeads.load(path)
    model.eval()
    with torch.no_grad():  # what the losses see: one forward pass, every layer
        training = cell_vector(layer_embeddings(model, model.preprocess(TEXTS), [1, 2, LAYERS]), cell)
    evaluation = cell_vector(encode_layers(model, TEXTS, [cell.layers], batch_size=3), cell)  # eval grid's path
    served = load(path).at(cell).encode(TEXTS)
    export_cell(path, cell, tmp_path / "export")
    exported = SentenceTransformer(str(tmp_path / "export"), device="cpu", trust_remote_code=not cell.is_float)
    standalone = exported.encode(TEXTS, convert_to_numpy=True)

    np.testing.assert_allclose(evaluation.numpy(), training.numpy(), atol=1e-5)
    np.testing.assert_allclose(standalone, float_form(training, cell, heads), atol=1e-5)
    if cell.is_float:
        np.testing.assert_allclose(served, training.numpy(), atol=1e-5)
        return
    codes = cell_codes(training, cell, heads)
    np.testing.assert_array_equal(served.packed, codes.packed)
    np.testing.assert_array_equal(cell_codes(evaluation, cell, heads).packed, codes.packed)
    with torch.no_grad():  # the float forms the binary losses train on are these codes
        forms = heads.encode_float(training, cell.with_bits(32))[: cell.bits]
    np.testing.assert_array_equal(planes_from_floats(forms).numpy(), codes.unpack())


def test_a_truncated_pre_norm_model_applies_its_final_norm_after_the_exit(checkpoint):
    """The exit of layer l equals what a model keeping l blocks computes, for every architecture."""
    path, _ = checkpoint
    model = SentenceTransformer(str(path), device="cpu").eval()
    with torch.no_grad():
        layers = layer_embeddings(model, model.preprocess(TEXTS), [1, 2])
    for exit_layer in (1, 2):
        truncated = SentenceTransformer(str(path), device="cpu").eval()
        keep_layers(truncated, exit_layer)
        with torch.no_grad():
            own = truncated(truncated.preprocess(TEXTS))["sentence_embedding"]
        torch.testing.assert_close(layers[exit_layer], own, atol=1e-5, rtol=0)
