"""Every layer's sentence embedding from ONE forward pass.

The transformer runs once with ``output_hidden_states``; the token states of layer ``l`` then go through
the model's own modules after the transformer (its Pooling, Dense, Normalize...), exactly as the last
layer does. Layer ``l`` means ``hidden_states[l]``: 0 is the embedding output, ``num_layers`` the last.

Models with a final norm after the last block (pre-norm decoders such as Llama or Qwen) return a
normalised last state but un-normalised intermediate ones, since Hugging Face applies that norm only
to the final output. Such intermediate cells see pre-norm states; training them with the 2D Matryoshka
losses teaches the model to make them usable. BERT-style encoders (norm inside every block) have no
such difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from trainer.grid import Cell


def transformer_config(model: SentenceTransformer):
    return model[0].auto_model.config


def num_layers(model: SentenceTransformer) -> int:
    return int(transformer_config(model).num_hidden_layers)


def embedding_dim(model: SentenceTransformer) -> int:
    return int(model.get_embedding_dimension())


def layer_stack(model: SentenceTransformer) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the transformer's list of blocks, e.g. ``(bert.encoder, "layer")``."""
    depth = num_layers(model)
    for module in model[0].auto_model.modules():
        for attribute, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == depth:
                return module, attribute
    raise ValueError(f"cannot find the list of {depth} transformer blocks in {type(model[0].auto_model).__name__}")


def keep_layers(model: SentenceTransformer, layers: int) -> None:
    """Physically drop every block after the first ``layers`` (and say so in the config)."""
    parent, attribute = layer_stack(model)
    setattr(parent, attribute, nn.ModuleList(list(getattr(parent, attribute))[:layers]))
    transformer_config(model).num_hidden_layers = layers


@contextmanager
def early_exit(model: SentenceTransformer, layers: int) -> Iterator[None]:
    """Run only the first ``layers`` blocks inside the block (real early exit), then restore the model."""
    parent, attribute = layer_stack(model)
    blocks, depth = getattr(parent, attribute), num_layers(model)
    keep_layers(model, layers)
    try:
        yield
    finally:
        setattr(parent, attribute, blocks)
        transformer_config(model).num_hidden_layers = depth


@contextmanager
def hidden_states_enabled(model: SentenceTransformer) -> Iterator[None]:
    """Make the transformer return all hidden states for the duration of the block."""
    config = transformer_config(model)
    previous = config.output_hidden_states
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = previous


def embed_layers(
    model: SentenceTransformer,
    features: dict[str, Tensor],
    layers: Iterable[int],
    forward: nn.Module | None = None,
) -> dict[int, Tensor]:
    """Pooled sentence embeddings of each requested layer from one forward pass.

    ``forward`` is the module to call for the pass, e.g. the DDP-wrapped model during distributed
    training (so gradient synchronisation sees the call); ``model`` is the plain SentenceTransformer
    whose modules pool the intermediate layers.
    """
    with hidden_states_enabled(model):
        output = (forward or model)(dict(features))
    hidden = output["all_layer_embeddings"]
    last = len(hidden) - 1
    after_transformer = list(model.children())[1:]
    result: dict[int, Tensor] = {}
    for layer in sorted(set(layers)):
        if layer == last:
            result[layer] = output["sentence_embedding"]
            continue
        pooled = {**output, "token_embeddings": hidden[layer]}
        pooled.pop("sentence_embedding", None)
        for module in after_transformer:
            pooled = module(pooled)
        result[layer] = pooled["sentence_embedding"]
    return result


def cell_embedding(layer_embeddings: dict[int, Tensor], cell: Cell) -> Tensor:
    """A float cell's embedding: the layer's first ``cell.dim`` dims, re-normalised to unit length."""
    return F.normalize(layer_embeddings[cell.layers][..., : cell.dim].float(), dim=-1)


@torch.inference_mode()
def encode_layers(
    model: SentenceTransformer,
    texts: list[str],
    layers: Iterable[int],
    batch_size: int = 64,
    show_progress_bar: bool = False,
    prompt: str | None = None,
) -> dict[int, Tensor]:
    """Float32 embeddings (CPU) of every requested layer for ``texts``, each text encoded once."""
    from tqdm.auto import tqdm

    layers = sorted(set(layers))
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # length-sorted batches, like encode()
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="Encoding", disable=not show_progress_bar):
        batch = [texts[i] for i in order[start : start + batch_size]]
        if prompt:
            batch = [prompt + t for t in batch]
        features = model.preprocess(batch)
        features = {k: v.to(model.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        for layer, emb in embed_layers(model, features, layers).items():
            chunks[layer].append(emb.float().cpu())
    inverse = torch.empty(len(texts), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(texts))
    return {layer: torch.cat(parts)[inverse] if parts else torch.empty(0) for layer, parts in chunks.items()}
