"""Recurrent binarization heads: learned multi-bit codes for every (layer, dim) cell.

The head follows "Binary Embedding-based Retrieval at Tencent" (Gan et al., KDD 2023). For a unit float
embedding ``x`` (a cell's re-normalised prefix of ``d`` dims) and ``u`` residual steps:

    b_0 = sign(W(x)),  e_0 = b_0
    for k = 1..u:
        x_hat_k = normalize(B_{k-1}(e_{k-1}))         # what the code so far says x is
        b_k     = sign(R_{k-1}(x - x_hat_k))           # one more bit plane for the residual
        e_k     = e_{k-1} + 2^-k * b_k

The code of ``k + 1`` bits per dim is ``(b_0 .. b_k)`` and its float form is ``e_k``, which is exactly
``trainer.binary.codes.PackedCodes.to_float`` (plane ``i`` weighted ``2^-i``). Depths are nested by construction:
the 1-bit code is a prefix of the 2-bit code. ``W``, ``B_k`` and ``R_k`` are MLP blocks
``Linear(d, h) -> BatchNorm1d(h) -> ReLU -> Linear(h, d)``; ``sign`` is a straight-through estimator whose
gradient passes where ``|z| <= 1`` (Hubara et al. 2016, "Binarized Neural Networks").

Sharing across the grid. A head maps ``d`` dims to ``d`` bits per plane, so a cell's code at dim ``d``
never needs the coordinates beyond ``d`` (the dim-prefix property holds by construction: the head only
ever sees the cell's prefix). ``sharing`` chooses which cells share a head:

- ``"dim"`` (default): one head per dim, shared by every layer. Every layer of an elastic model is trained
  to live in the same space as the last one (2D Matryoshka KL alignment), so one quantiser per width fits
  all of them, costs ``len(dims)`` heads instead of ``len(layers) * len(dims)``, and each head sees
  ``len(layers)`` times more training data.
- ``"cell"``: one head per (layer, dim), for models whose early layers are far from the last one (e.g. a
  model that was never trained with 2D Matryoshka losses).

Distributed training: the heads live in the loss, not in the DDP-wrapped model, so their gradients must be
all-reduced by the caller (the training callback does it); BatchNorm running statistics are per rank.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainer.binary.codes import PackedCodes, check_packable
from trainer.errors import UserError
from trainer.grid import FLOAT_BITS, Cell

HEADS_FOLDER = "binary_heads"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARING = ("dim", "cell")
MODES = ("joint", "head-only")

Sharing = Literal["dim", "cell"]


@dataclass
class BinaryConfig:
    """The recipe's ``binary:`` section.

    ``bits``: the code depths trained (and later servable), e.g. ``[1, 2, 4]``; the head has
    ``max(bits) - 1`` residual steps and a loss at every listed depth. ``hidden``: width of every MLP block.
    ``sharing``: ``dim`` or ``cell`` (see the module docstring). ``mode``: ``joint`` (encoder and heads
    together, ``trainer.train.losses.binary``) or ``head-only`` (frozen encoder, ``trainer.train.head_only``).
    ``weight`` / ``kl_weight`` / ``kl_temperature`` / ``scale``: the binary InfoNCE weight, the weight of the
    KL to the float cell's scores, its temperature, and the logit scale (1 / temperature) of the InfoNCE.
    ``lr``: the heads' learning rate, in both modes (joint training gives the randomly initialised heads
    this rate, not the encoder's). Head-only settings: ``steps``, ``batch_size``, ``weight_decay``,
    ``max_texts`` (cap on the number of raw texts encoded, None = all), ``seed``, ``cache_dir`` (where float
    embeddings are cached, None = ``<output_dir>/binary_heads_cache``).
    """

    bits: list[int] = field(default_factory=lambda: [1, 2, 4])
    hidden: int = 512
    sharing: Sharing = "dim"
    mode: Literal["joint", "head-only"] = "joint"
    weight: float = 1.0
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    scale: float = 20.0
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_texts: int | None = None
    seed: int = 42
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits, key="binary.bits", error=UserError)
        if self.sharing not in SHARING:
            raise UserError(f"binary.sharing: {self.sharing!r} is not valid; use one of {list(SHARING)}")
        if self.mode not in MODES:
            raise UserError(f"binary.mode: {self.mode!r} is not valid; use one of {list(MODES)}")
        for key in ("hidden", "steps", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"binary.{key}: {value!r} is not valid; use a positive integer")
        if self.batch_size < 2:
            raise UserError(f"binary.batch_size: {self.batch_size} is not valid; in-batch InfoNCE needs >= 2")
        for key in ("scale", "kl_temperature", "lr"):
            if getattr(self, key) <= 0:
                raise UserError(f"binary.{key}: {getattr(self, key)!r} is not valid; use a number > 0")
        for key in ("weight", "kl_weight", "weight_decay"):
            if getattr(self, key) < 0:
                raise UserError(f"binary.{key}: {getattr(self, key)!r} is not valid; use a number >= 0")
        if self.max_texts is not None and self.max_texts < 2:
            raise UserError(f"binary.max_texts: {self.max_texts!r} is not valid; use None or an integer >= 2")

    def check_dims(self, dims: Iterable[int]) -> None:
        """Raise UserError when a grid dim cannot be packed into whole bytes."""
        for dim in dims:
            try:
                check_packable(dim)
            except UserError as error:
                raise UserError(f"binary: grid dim {dim} cannot get binary codes: {error}") from error


def check_bits(bits: Sequence[int], key: str = "bits", error: type[ValueError] = UserError) -> list[int]:
    """Validate code depths with the grid's rules (1..16; 32 is float, not a code); strictly increasing."""
    if isinstance(bits, (int, str)) or not bits:
        raise error(f"{key}: {bits!r} is not valid; give a non-empty list of depths, e.g. [1, 2, 4]")
    depths = []
    for value in bits:
        try:
            depth = int(value)
            Cell(1, 1, depth)
        except (UserError, TypeError, ValueError) as grid_error:
            raise error(f"{key}: {value!r} is not a valid depth: {grid_error}") from grid_error
        if depth == FLOAT_BITS:
            raise error(f"{key}: {FLOAT_BITS} means float, not a binary code; use depths 1..16, e.g. [1, 2, 4]")
        depths.append(depth)
    if any(b <= a for a, b in itertools.pairwise(depths)):
        raise error(f"{key}: {depths} must be strictly increasing, e.g. [1, 2, 4]")
    return depths


class SignSTE(torch.autograd.Function):
    """``sign(z)`` forward (``+1`` where ``z > 0``, else ``-1``, as packed codes read bits); straight-through
    backward ``dL/dz = dL/db * 1[|z| <= 1]`` (Hubara et al. 2016; BEBR uses the same estimator)."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return torch.where(z > 0, 1.0, -1.0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad * (z.abs() <= 1).to(grad.dtype)


def sign_ste(z: Tensor) -> Tensor:
    return SignSTE.apply(z)


def mlp_block(dim: int, hidden: int) -> nn.Sequential:
    """``Linear(dim, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, dim)``, BEBR's building block."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))


class RecurrentBinarizer(nn.Module):
    """One recurrent head for ``dim``-dimensional unit embeddings, ``steps`` residual steps (module docstring)."""

    def __init__(self, dim: int, steps: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.encoder = mlp_block(dim, hidden)
        self.decoders = nn.ModuleList(mlp_block(dim, hidden) for _ in range(steps))
        self.residuals = nn.ModuleList(mlp_block(dim, hidden) for _ in range(steps))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Float forms ``[e_0, .., e_steps]`` (each (N, dim)) of the nested codes of ``x`` (N, dim)."""
        floats = [sign_ste(self.encoder(x))]
        for k, (decoder, residual) in enumerate(zip(self.decoders, self.residuals, strict=True), start=1):
            x_hat = F.normalize(decoder(floats[-1]), dim=-1)
            plane = sign_ste(residual(x - x_hat))
            floats.append(floats[-1] + 2.0**-k * plane)
        return floats


def planes_from_floats(floats: Sequence[Tensor]) -> Tensor:
    """Bool planes (N, bits, dim) from float forms ``e_0..e_k``: ``b_0 = e_0``, ``b_i = 2^i (e_i - e_{i-1})``."""
    planes = [floats[0] > 0] + [(current - previous) > 0 for previous, current in itertools.pairwise(floats)]
    return torch.stack(planes, dim=1)


class BinaryHeads(nn.Module):
    """Recurrent binarization heads for the cells of a grid, trained at depths ``bits``.

    ``dims``: the cell widths that get codes (each a multiple of 8, see ``trainer.binary.codes``); ``layers``: the
    cell depths, needed only for ``sharing="cell"``. ``encode_float`` gives the differentiable float forms
    for training; ``encode`` the packed codes for serving.
    """

    def __init__(
        self,
        dims: Iterable[int],
        bits: Sequence[int],
        hidden: int = 512,
        sharing: Sharing = "dim",
        layers: Iterable[int] = (),
    ) -> None:
        super().__init__()
        self._bits = tuple(check_bits(bits))
        self.dims = tuple(sorted(set(int(d) for d in dims)))
        self.layers = tuple(sorted(set(int(layer) for layer in layers)))
        self.hidden = hidden
        self.sharing = sharing
        if sharing not in SHARING:
            raise ValueError(f"sharing: {sharing!r} is not valid; use one of {list(SHARING)}")
        if not self.dims:
            raise ValueError("dims: empty; give the cell widths that get binary codes")
        if sharing == "cell" and not self.layers:
            raise ValueError("layers: sharing='cell' needs the cell layers to build one head per (layer, dim)")
        for dim in self.dims:
            check_packable(dim)
        steps = self._bits[-1] - 1
        self.heads = nn.ModuleDict(
            {key: RecurrentBinarizer(dim, steps, hidden) for key, dim in self._head_dims().items()}
        )

    @property
    def bits(self) -> tuple[int, ...]:
        """The trained depths; ``encode`` serves exactly these."""
        return self._bits

    def _head_dims(self) -> dict[str, int]:
        if self.sharing == "dim":
            return {f"D{dim}": dim for dim in self.dims}
        return {f"L{layer}-D{dim}": dim for layer in self.layers for dim in self.dims}

    def head_for(self, cell: Cell) -> RecurrentBinarizer:
        """The head serving ``cell``; UserError when the cell was not trained."""
        key = f"D{cell.dim}" if self.sharing == "dim" else cell.name2d
        if key not in self.heads:
            trained = [f"D{d}" for d in self.dims] if self.sharing == "dim" else list(self.heads)
            raise UserError(f"cell {cell.name2d} has no binary head; heads were trained for {trained}")
        return self.heads[key]

    def encode_float(self, x: Tensor, cell: Cell) -> list[Tensor]:
        """Float forms ``e_0 .. e_{max(bits)-1}`` of unit embeddings ``x`` (N, cell.dim); differentiable."""
        if x.shape[-1] != cell.dim:
            raise UserError(f"cell {cell.name2d} needs embeddings of {cell.dim} dims, got {x.shape[-1]}")
        return self.head_for(cell)(x)

    forward = encode_float

    def code_forms(self, embeddings: dict[Cell, list[Tensor]], bits: Sequence[int]) -> dict[Cell, list[Tensor]]:
        """Unit float forms of every float cell's codes at each depth in ``bits``, per input column:
        ``{cell.with_bits(k): [normalize(e_{k-1}(column)) ...]}``; differentiable, for the training losses."""
        codes: dict[Cell, list[Tensor]] = {}
        for cell, columns in embeddings.items():
            forms = [self.encode_float(column, cell) for column in columns]
            for depth in bits:
                codes[cell.with_bits(depth)] = [F.normalize(f[depth - 1], dim=-1) for f in forms]
        return codes

    def check_serves(self, cell: Cell) -> None:
        """UserError unless these heads can encode ``cell``: a packable dim, a trained depth, a head for it."""
        check_packable(cell.dim)
        self.check_depth(cell.bits)
        self.head_for(cell)

    def check_depth(self, bits: int) -> None:
        if bits <= 0 or bits not in self._bits:
            raise UserError(f"bits={bits} was not trained: these heads serve depths {list(self._bits)}")

    @torch.no_grad()
    def encode(self, embeddings: Tensor | np.ndarray, cell: Cell) -> PackedCodes:
        """Packed codes of ``cell.bits`` planes for the float cell's unit embeddings (N, cell.dim).

        Runs in eval mode (BatchNorm running statistics) and restores the previous mode afterwards.
        """
        self.check_depth(cell.bits)
        head = self.head_for(cell)
        x = embeddings if isinstance(embeddings, Tensor) else torch.from_numpy(np.asarray(embeddings))
        parameter = next(head.parameters())
        x = F.normalize(x.to(parameter.device, parameter.dtype), dim=-1)
        was_training = self.training
        self.eval()
        try:
            floats = self.encode_float(x, cell)[: cell.bits]
        finally:
            self.train(was_training)
        return PackedCodes.from_planes(planes_from_floats(floats).cpu().numpy())

    def config(self) -> dict:
        return {
            "dims": list(self.dims),
            "bits": list(self._bits),
            "hidden": self.hidden,
            "sharing": self.sharing,
            "layers": list(self.layers),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``<directory>/binary_heads/{config.json, model.safetensors}``; returns that folder."""
        folder = Path(directory) / HEADS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        return folder

    def load_state(self, directory: str | Path) -> None:
        """Load weights saved by ``save_pretrained(directory)`` into these heads (same configuration)."""
        folder = Path(directory) / HEADS_FOLDER
        saved = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if saved != self.config():
            raise UserError(f"{folder}: saved heads {saved} differ from these heads {self.config()}")
        device = next(self.parameters()).device
        self.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(device)))

    @classmethod
    def load(cls, directory: str | Path) -> BinaryHeads | None:
        """Heads saved under ``<directory>/binary_heads``, in eval mode; None when the model has none."""
        folder = Path(directory) / HEADS_FOLDER
        if not (folder / CONFIG_FILE).is_file():
            return None
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        heads = cls(**config)
        heads.load_state(directory)
        return heads.eval()
