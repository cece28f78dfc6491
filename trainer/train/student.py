"""The student model a recipe trains, loaded as training, WiSE-FT and the benchmarks load it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sentence_transformers import SentenceTransformer

from trainer.decoder import decoder_embedder, needs_decoder_modules
from trainer.lora import add_lora
from trainer.train.recipe import ModelConfig


def load_model(config: ModelConfig) -> SentenceTransformer:
    """The student: a sentence-transformers model, or a last-token embedder of a plain decoder LLM
    (``trainer.decoder``); with the recipe's prompts, and LoRA adapters when ``model.lora`` is set."""
    if Path(config.name).is_dir():  # absolute, so that adapter checkpoints find their base model from anywhere
        config = dataclasses.replace(config, name=str(Path(config.name).resolve()))
    if needs_decoder_modules(config):
        model = decoder_embedder(config)
    else:
        model = SentenceTransformer(config.name, revision=config.revision, trust_remote_code=config.trust_remote_code)
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    if config.prompts is not None:
        model.prompts = {**model.prompts, **config.prompts}
    if config.lora is not None:
        add_lora(model, **dataclasses.asdict(config.lora))
    return model
