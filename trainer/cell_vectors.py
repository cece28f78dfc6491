"""The one definition of a cell's vector, used by training, evaluation, ``load(...).at(cell)`` and export.

For a cell ``L<l>-D<d>-B<b>`` and a text:

1. **Layer exit.** ``h_l``, the token states after the first ``l`` transformer blocks. Models with a norm
   after their last block (pre-norm models: Llama, Qwen, Mistral, ModernBERT...) get that **final norm
   applied at every exit**, ``norm(h_l)``, exactly as a model truncated to ``l`` blocks computes it; so a
   cell is the same vector whether it is cut from one full forward pass (training, evaluation) or computed by
   a model that runs only ``l`` blocks (serving with early exit, an exported cell). Post-norm encoders
   (BERT, MiniLM, MPNet) have no final norm and use ``h_l`` as is.
2. **The model's own modules** after the transformer: its Pooling (mean, CLS, last token...), Dense,
   Normalize, exactly as for the last layer.
3. **Dim prefix**: the first ``d`` coordinates, re-normalised to unit length (Matryoshka truncation).
4. **Code** (``b < 32``): the binarization heads' ``b``-bit code of that unit vector; a model without trained
   heads uses the parameter-free residual sign quantiser (``BinaryHeads.parameter_free``), whose 1-bit code
   is the sign of each coordinate. Codes score by ``trainer.binary.codes.code_scores``.

``layer_embeddings`` does steps 1-2 for several layers from ONE forward pass (``output_hidden_states``);
``cell_vector`` step 3; ``cell_codes`` step 4; ``encode_layers`` runs steps 1-2 over texts in batches, and
``LayerEncoder`` is it as the chunk encoder of an on-disk store (``trainer.store``). ``ExitClock`` prices every
early exit from that same pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from trainer.binary.codes import PackedCodes
from trainer.binary.heads import BinaryHeads
from trainer.grid import Cell

FINAL_NORM_NAMES = ("norm", "final_norm", "ln_f", "final_layer_norm", "final_layernorm")


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


def final_norm(model: SentenceTransformer) -> nn.Module | None:
    """The norm a pre-norm model applies after its last block (``norm``, ``final_norm``, ``ln_f``...), else None.

    It is looked up among the children of the base model and of the module holding the block list.
    """
    parent, _ = layer_stack(model)
    for owner in (model[0].auto_model, parent):
        for name in FINAL_NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, nn.Module) and "norm" in type(module).__name__.lower():
                return module
    return None


def keep_layers(model: SentenceTransformer, layers: int) -> None:
    """Physically drop every block after the first ``layers`` (and say so in the config)."""
    parent, attribute = layer_stack(model)
    setattr(parent, attribute, nn.ModuleList(list(getattr(parent, attribute))[:layers]))
    config = transformer_config(model)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention types (Qwen, Gemma...)
        config.layer_types = config.layer_types[:layers]


@contextmanager
def early_exit(model: SentenceTransformer, layers: int) -> Iterator[None]:
    """Run only the first ``layers`` blocks inside the block (real early exit), then restore the model."""
    parent, attribute = layer_stack(model)
    config = transformer_config(model)
    blocks, depth, layer_types = (
        getattr(parent, attribute),
        config.num_hidden_layers,
        getattr(config, "layer_types", None),
    )
    keep_layers(model, layers)
    try:
        yield
    finally:
        setattr(parent, attribute, blocks)
        config.num_hidden_layers = depth
        if layer_types is not None:
            config.layer_types = layer_types


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


def layer_embeddings(
    model: SentenceTransformer,
    features: dict[str, Tensor],
    layers: Iterable[int],
    forward: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> dict[int, Tensor]:
    """Pooled sentence embeddings of each requested layer exit (steps 1-2 of the module docstring), from one
    forward pass. ``layers`` may include the model's current depth, whose embedding is the model's own output.

    ``forward`` is what to call for the pass, e.g. the DDP-wrapped model during distributed training (so
    gradient synchronisation sees the call); ``model`` is the plain SentenceTransformer whose modules pool
    the intermediate layers.
    """
    layers = sorted(set(layers))
    depth = num_layers(model)
    if layers[0] < 1 or layers[-1] > depth:
        raise ValueError(f"layers {layers} are not exits of a model with {depth} blocks")
    if layers == [depth]:  # the model's own output; no hidden states (see below)
        return {depth: (forward or model)(dict(features))["sentence_embedding"]}
    # transformers installs its hidden-state hooks on the blocks present at the first call that asks for them,
    # so a truncated model (early_exit) must never ask: later full passes would miss the dropped blocks' states.
    with hidden_states_enabled(model):
        output = (forward or model)(dict(features))
    hidden = output["all_layer_embeddings"]
    if len(hidden) != depth + 1:
        raise RuntimeError(f"the model returned {len(hidden)} hidden states for {depth} blocks")
    norm = final_norm(model)
    after_transformer = list(model.children())[1:]
    result: dict[int, Tensor] = {}
    for layer in layers:
        if layer == depth:
            result[layer] = output["sentence_embedding"]
            continue
        states = norm(hidden[layer]) if norm is not None else hidden[layer]
        pooled = {**output, "token_embeddings": states}
        pooled.pop("sentence_embedding", None)
        for module in after_transformer:
            pooled = module(pooled)
        result[layer] = pooled["sentence_embedding"]
    return result


def cell_vector(layers: dict[int, Tensor], cell: Cell) -> Tensor:
    """A float cell's vector (step 3): the layer's first ``cell.dim`` dims, re-normalised to unit length."""
    return F.normalize(layers[cell.layers][..., : cell.dim].float(), dim=-1)


def code_heads(heads: BinaryHeads | None, cell: Cell) -> BinaryHeads:
    """The heads that encode ``cell``: the trained ones, else the parameter-free residual sign quantiser."""
    if heads is not None:
        heads.check_serves(cell)
        return heads
    return BinaryHeads.parameter_free([cell.dim], bits=list(range(1, cell.bits + 1)))


def cell_codes(vectors: Tensor | np.ndarray, cell: Cell, heads: BinaryHeads | None) -> PackedCodes:
    """A binary cell's codes (step 4) of its unit float vectors (N, cell.dim)."""
    return code_heads(heads, cell).encode(vectors, cell)


def layer_codes(layer: Tensor, cell: Cell, heads: BinaryHeads | None) -> PackedCodes:
    """A binary cell's codes of a layer's embeddings (N, width): steps 3-4. A code that is the sign bits of its
    input (``BinaryHeads.signs_only``) is taken from the raw prefix: re-normalising does not change a sign."""
    heads = code_heads(heads, cell)
    if heads.signs_only(cell):
        return heads.encode(layer[..., : cell.dim], cell)
    return heads.encode(cell_vector({cell.layers: layer}, cell.with_bits(32)), cell)


@dataclass
class ExitClock:
    """What encoding costs at each layer exit, clocked inside full forward passes (``encode_layers(clock=...)``).

    Forward hooks stamp the time each block returns. A batch started at ``t0`` (tokenisation included), whose
    block ``l`` returned at ``t_l``, whose last block returned at ``t_depth`` and whose ``p`` pooled layers were
    all on the CPU at ``t_end``, would have cost

        t_l - t0 + (t_end - t_depth) / p

    with real early exit at layer ``l`` (``early_exit``): tokenisation, the first ``l`` blocks, and one
    layer's share of the pooling. ``seconds[l]`` sums this over the batches after the first ``skip`` (warm-up),
    ``texts`` counts their texts and ``batches`` every batch clocked; so one pass prices every exit. On CUDA
    each stamp waits for the device.
    """

    skip: int = 0
    seconds: dict[int, float] = field(default_factory=dict)
    texts: int = 0
    batches: int = 0
    timer: Callable[[], float] = time.perf_counter

    def texts_per_second(self) -> dict[int, float]:
        return {layer: self.texts / seconds for layer, seconds in self.seconds.items()}

    @contextmanager
    def batch(self, model: SentenceTransformer, size: int, pooled: int) -> Iterator[None]:
        """Clock one batch of ``size`` texts whose ``pooled`` layers are computed inside the block."""
        parent, attribute = layer_stack(model)
        blocks = getattr(parent, attribute)
        on_cuda = model.device.type == "cuda"
        stamps: list[float] = []

        def stamp(*_) -> None:
            if on_cuda:
                torch.cuda.synchronize(model.device)
            stamps.append(self.timer())

        start = self.timer()
        handles = [block.register_forward_hook(stamp) for block in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        stamp()
        if len(stamps) != len(blocks) + 1:
            raise RuntimeError(f"ExitClock: {len(stamps) - 1} block exits clocked for {len(blocks)} blocks")
        self.batches += 1
        if self.batches <= self.skip:
            return
        end, last = stamps.pop(), stamps[-1]
        for layer, returned in enumerate(stamps, start=1):
            self.seconds[layer] = self.seconds.get(layer, 0.0) + returned - start + (end - last) / pooled
        self.texts += size


@torch.inference_mode()
def encode_layers(
    model: SentenceTransformer,
    texts: list[str],
    layers: Iterable[int],
    batch_size: int = 64,
    show_progress_bar: bool = False,
    prompt: str | None = None,
    clock: ExitClock | None = None,
) -> dict[int, Tensor]:
    """Float32 embeddings (CPU) of every requested layer exit for ``texts``, each text encoded once; ``clock``
    times every exit of the same passes (``ExitClock``)."""
    from tqdm.auto import tqdm

    layers = sorted(set(layers))
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # length-sorted batches, like encode()
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="Encoding", unit="batch", disable=not show_progress_bar):
        batch = [texts[i] for i in order[start : start + batch_size]]
        if prompt:
            batch = [prompt + t for t in batch]
        with clock.batch(model, len(batch), len(layers)) if clock else nullcontext():
            features = model.preprocess(batch)
            features = {k: v.to(model.device) if isinstance(v, Tensor) else v for k, v in features.items()}
            for layer, emb in layer_embeddings(model, features, layers).items():
                chunks[layer].append(emb.float().cpu())
    inverse = torch.empty(len(texts), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(texts))
    return {layer: torch.cat(parts)[inverse] if parts else torch.empty(0) for layer, parts in chunks.items()}


def layer_name(layer: int) -> str:
    """The name of a layer's matrix in a store: ``L<layer>``."""
    return f"L{layer}"


@dataclass
class LayerEncoder:
    """``encode_layers`` as a store's chunk encoder: ``{"L<l>": float32 (N, D)}`` per layer; ``to(device)``
    moves the model, so that ``trainer.store.build_store`` can run one copy per device. ``clock`` times the
    exits of the chunks encoded in this process."""

    model: SentenceTransformer
    layers: tuple[int, ...]
    batch_size: int = 64
    prompt: str | None = None
    clock: ExitClock | None = None

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = encode_layers(
            self.model, texts, self.layers, batch_size=self.batch_size, prompt=self.prompt, clock=self.clock
        )
        return {layer_name(layer): emb.numpy() for layer, emb in encoded.items()}

    def to(self, device: str) -> LayerEncoder:
        self.model.to(device)
        return self

    def __setstate__(self, state: dict) -> None:
        """Unpickled in a worker process: transformers (5.x) registers which outputs a model class can record
        (``output_hidden_states``) in ``PreTrainedModel.__init__``, which unpickling skips; without that
        registration no hidden states come back, so register them as ``__init__`` does."""
        self.__dict__.update(state)
        try:
            from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
        except ImportError:  # transformers without output recorders returns hidden states by itself
            return
        for module in self.model.modules():
            if hasattr(module, "_can_record_outputs"):
                _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def encode_cell(
    model: SentenceTransformer,
    texts: list[str],
    cell: Cell,
    heads: BinaryHeads | None = None,
    batch_size: int = 32,
    prompt: str | None = None,
) -> np.ndarray | PackedCodes:
    """One cell of ``texts``, running only the cell's first ``cell.layers`` blocks (serving, early exit):
    float32 (N, dim) unit vectors for B32 cells, packed codes for binary ones."""
    with early_exit(model, cell.layers):
        layers = encode_layers(model, texts, [cell.layers], batch_size=batch_size, prompt=prompt)
    vectors = cell_vector(layers, cell)
    return vectors.numpy() if cell.is_float else cell_codes(vectors, cell, heads)
