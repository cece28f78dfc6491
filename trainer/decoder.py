"""Decoder-LLM students (Qwen, Llama, Mistral...): inputs, pooling and prompts of a decoder embedder.

A decoder LLM embeds a text as the final state of its last token, the only one that has attended to the whole
text (Wang et al. 2024, "Improving Text Embeddings with Large Language Models", e5-mistral; Zhang et al. 2025,
"Qwen3 Embedding"):

- the tokenizer appends the EOS token to every text (also when it truncates), so the last token is always the
  same special token;
- texts are padded on the left, so the last position of every row is that token;
- ``Pooling(pooling_mode="lasttoken")`` takes its state, ``Normalize`` makes it a unit vector;
- queries carry an instruction prompt, ``"Instruct: <task>\\nQuery:"``; documents none.

A model with its own sentence-transformers config (Qwen3-Embedding, gte-Qwen2, e5-mistral) already defines all
of this and is used as it is. A plain decoder LLM (``architectures: [Qwen3ForCausalLM]``, no ``modules.json``)
gets it from ``decoder_embedder``; its tokenizer settings are saved with every checkpoint and export, so a
plain ``SentenceTransformer(dir)`` reads texts the same way. A layer exit of these pre-norm models applies the
final norm (``trainer.cell_vectors``).

``column_prompts`` gives training the prompts evaluation and serving use: the model's ``query`` prompt for the
anchor column and its ``document`` prompt for the others.
"""

from __future__ import annotations

import logging

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers import AutoTokenizer

from trainer.errors import UserError
from trainer.serve.checkpoint import read_model_json
from trainer.train.recipe import ModelConfig

logger = logging.getLogger(__name__)

# Qwen3-Embedding's retrieval instruction (its config_sentence_transformers.json), with the space before the text.
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
DEFAULT_PROMPTS = {"query": QUERY_PROMPT, "document": ""}


def is_causal_lm(config: dict) -> bool:
    """A decoder-only LLM checkpoint: its ``architectures`` are ``*ForCausalLM`` (Qwen3ForCausalLM, ...)."""
    return any(name.endswith("ForCausalLM") for name in config.get("architectures") or [])


def needs_decoder_modules(model: ModelConfig) -> bool:
    """A decoder LLM that has no sentence-transformers modules of its own."""
    config = read_model_json(model.name, "config.json", model.revision, "model.name") or {}
    return is_causal_lm(config) and read_model_json(model.name, "modules.json", model.revision, "model.name") is None


def decoder_embedder(model: ModelConfig) -> SentenceTransformer:
    """Transformer (left padding, EOS appended) + last-token Pooling + Normalize, with ``DEFAULT_PROMPTS``."""
    loading = dict(revision=model.revision, trust_remote_code=model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model.name, **loading)
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.name: the tokenizer of {model.name!r} has no EOS token to pool")
    plain = tokenizer("x")["input_ids"]
    settings = {"padding_side": "left"}
    if plain[-1] != tokenizer.eos_token_id:  # transformers rebuilds the template: keep a BOS it adds
        settings |= {"add_eos_token": True, "add_bos_token": plain[0] == tokenizer.bos_token_id}
    if tokenizer.pad_token is None:
        settings["pad_token"] = tokenizer.eos_token
    transformer = Transformer(
        model.name, model_kwargs=loading, processor_kwargs={**loading, **settings}, config_kwargs=loading
    )
    ids = transformer.tokenizer("x")["input_ids"]
    if ids[-1] != tokenizer.eos_token_id or ids[:-1] != [i for i in plain if i != tokenizer.eos_token_id]:
        raise UserError(f"model.name: cannot make the tokenizer of {model.name!r} append its EOS token (got {ids})")
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    logger.info("%s is a decoder LLM: last-token pooling, left padding, EOS appended", model.name)
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], prompts=dict(DEFAULT_PROMPTS))


def column_prompts(model: SentenceTransformer, columns: list[str]) -> dict[str, str]:
    """The training prompt of each text column: the model's ``query`` prompt for ``anchor``, its ``document``
    prompt for every other column (positives, negatives, label-free ``text``); empty prompts are left out."""
    prompts = model.prompts or {}
    chosen = {column: prompts.get("query" if column == "anchor" else "document", "") for column in columns}
    return {column: prompt for column, prompt in chosen.items() if prompt}
