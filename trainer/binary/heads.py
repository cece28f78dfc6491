"""Recurrent binarization heads: learned multi-bit codes for every (layer, dim) cell.

The recurrence follows "Binary Embedding-based Retrieval at Tencent" (Gan et al., KDD 2023). For a unit
float embedding ``x`` of ``d`` dims (a cell's re-normalised prefix) and ``u`` residual steps:

    b_0 = sign(x + W(x)),                               e_0 = b_0
    for k = 1..u:
        x_hat_k = e_{k-1} / sqrt(d) + B_k(e_{k-1})      # what the code so far says x is
        r_k     = x - x_hat_k
        b_k     = sign(r_k + R_k(r_k))                  # one more bit plane for the residual
        e_k     = e_{k-1} + 2^-k * b_k

``W``, ``B_k`` and ``R_k`` are MLP blocks ``Linear(d, h) -> BatchNorm1d(h) -> ReLU -> Linear(h, d)`` whose
last layer starts at zero, so an untrained head is exactly the parameter-free **residual sign quantiser**:
its 1-bit code is the sign of the float cell (the baseline every code is compared with) and ``k + 1`` bits
are a uniform scalar quantiser of every coordinate with step ``2^-k / sqrt(d)`` (``sqrt(d)`` is the
coordinate scale of a unit vector). Learning moves from there and never starts below that baseline; AdamW's
weight decay pulls the blocks back towards it. (BEBR's blocks start random and normalise ``x_hat``; on the
collections in ``../shared/data`` the uniform residual quantiser beats normalised reconstructions at every
depth, and random heads start below sign bits.) ``sign`` is a straight-through estimator whose gradient
passes where ``|z| <= 1`` (Hubara et al. 2016, "Binarized Neural Networks").

The code of ``k + 1`` bits is ``(b_0 .. b_k)`` with float form ``e_k`` (plane ``i`` weighted ``2^-i``,
``trainer.binary.codes``); depths are nested by construction, the 1-bit code being a prefix of the 2-bit one.

Sharing across the grid: a head maps ``d`` dims to ``d`` bits per plane and sees only the cell's prefix, so
the dim-prefix property holds by construction. ``sharing="dim"`` (default) gives one head per dim shared by
every layer (2D Matryoshka training puts all layers in the last layer's space; ``len(dims)`` heads, each
seeing ``len(layers)`` times more data); ``"cell"`` one head per (layer, dim).

Distributed training: the heads live in the loss, not in the DDP-wrapped model, so the training callback
all-reduces their gradients; BatchNorm running statistics are per rank.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.binary.codes import PackedCodes, check_packable, sign_codes
from trainer.errors import UserError
from trainer.grid import FLOAT_BITS, MAX_CODE_BITS, Cell

HEADS_FOLDER = "binary_heads"
ENCODE_ROWS = 8192  # rows per block in encode()
SHARING = ("dim", "cell")

Sharing = Literal["dim", "cell"]


def check_bits(bits: Sequence[int], key: str = "bits") -> list[int]:
    """Validate code depths with the grid's rules (1..16; 32 is float, not a code); strictly increasing."""
    if isinstance(bits, (int, str)) or not bits:
        raise UserError(f"{key}: {bits!r} is not valid; give a non-empty list of depths, e.g. [1, 2, 4]")
    depths = []
    for value in bits:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CODE_BITS:
            hint = " (32 means float, not a code)" if value == FLOAT_BITS else ""
            raise UserError(
                f"{key}: {value!r} is not a code depth{hint}; use integers 1..{MAX_CODE_BITS}, e.g. [1, 2, 4]"
            )
        depths.append(value)
    if any(b <= a for a, b in itertools.pairwise(depths)):
        raise UserError(f"{key}: {depths} must be strictly increasing, e.g. [1, 2, 4]")
    return depths


def depth_shares(bits: Sequence[int], weights: Sequence[float] | None, key: str = "bit_weights") -> dict[int, float]:
    """Each depth's share ``w_k / sum_j w_j`` of the code terms, from one weight >= 0 per depth of ``bits``
    (None: equal shares); UserError naming ``key`` (e.g. ``binary.bit_weights``) otherwise."""
    if weights is None:
        return {depth: 1.0 / len(bits) for depth in bits}
    if (
        isinstance(weights, (str, int, float))
        or len(weights) != len(bits)
        or any(isinstance(w, bool) or not isinstance(w, int | float) or w < 0 for w in weights)
        or sum(weights) <= 0
    ):
        raise UserError(
            f"{key}: {weights!r} is not valid; give one number >= 0 per depth of {key.replace('bit_weights', 'bits')} "
            f"{list(bits)} (not all 0), e.g. {[2] + [1] * (len(bits) - 1)}"
        )
    return {depth: w / sum(weights) for depth, w in zip(bits, weights, strict=True)}


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


def residual_block(dim: int, hidden: int) -> nn.Sequential:
    """``Linear(dim, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, dim)``, BEBR's building block, with the
    last layer at zero so that ``z + block(z)`` starts as ``z``."""
    block = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))
    nn.init.zeros_(block[-1].weight)
    nn.init.zeros_(block[-1].bias)
    return block


def corrected(z: Tensor, block: nn.Module | None) -> Tensor:
    """``z + block(z)``, or ``z`` for a head without learned blocks."""
    return z if block is None else z + block(z)


class RecurrentBinarizer(nn.Module):
    """One recurrent head for ``dim``-dimensional unit embeddings, ``steps`` residual steps (module docstring).

    ``hidden=0`` builds no blocks at all: the head is then the residual sign quantiser itself, with no
    parameters and no cost beyond the signs.
    """

    def __init__(self, dim: int, steps: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.steps = dim, steps
        self.step_size = 1.0 / math.sqrt(dim)
        self.encoder = residual_block(dim, hidden) if hidden else None
        self.decoders = nn.ModuleList(residual_block(dim, hidden) for _ in range(steps)) if hidden else None
        self.residuals = nn.ModuleList(residual_block(dim, hidden) for _ in range(steps)) if hidden else None

    def forward(self, x: Tensor) -> list[Tensor]:
        """Float forms ``[e_0, .., e_steps]`` (each (N, dim)) of the nested codes of ``x`` (N, dim)."""
        floats = [sign_ste(corrected(x, self.encoder))]
        for k in range(1, self.steps + 1):
            decoder = self.decoders[k - 1] if self.decoders is not None else None
            residual = self.residuals[k - 1] if self.residuals is not None else None
            x_hat = self.step_size * floats[-1] + (decoder(floats[-1]) if decoder is not None else 0.0)
            floats.append(floats[-1] + 2.0**-k * sign_ste(corrected(x - x_hat, residual)))
        return floats


def unit_forms(head: RecurrentBinarizer, x: Tensor, depths: Sequence[int]) -> tuple[Tensor, ...]:
    """The unit-normalised float forms of ``x``'s codes at each of ``depths``."""
    floats = head(x)
    return tuple(F.normalize(floats[depth - 1], dim=-1) for depth in depths)


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restores ``module``'s buffers (BatchNorm running statistics) on exit: a recomputed forward pass
    must not update them a second time."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved, strict=True):
                buffer.copy_(value)


def check_width(x: Tensor | np.ndarray, cell: Cell) -> None:
    if x.shape[-1] != cell.dim:
        raise UserError(f"cell {cell.name2d} needs embeddings of {cell.dim} dims, got {x.shape[-1]}")


def planes_from_floats(floats: Sequence[Tensor]) -> Tensor:
    """Bool planes (N, bits, dim) from float forms ``e_0..e_k``: ``b_0 = e_0``, ``b_i = 2^i (e_i - e_{i-1})``."""
    planes = [floats[0] > 0] + [(current - previous) > 0 for previous, current in itertools.pairwise(floats)]
    return torch.stack(planes, dim=1)


class BinaryHeads(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="elastic-embeddings",
    tags=["binary-embeddings", "bebr"],
    paper_url="https://arxiv.org/abs/2302.08714",
):
    """Recurrent binarization heads for the cells of a grid, trained at depths ``bits``.

    ``dims``: the cell widths that get codes (each a multiple of 8, see ``trainer.binary.codes``); ``layers``:
    the cell depths, needed only for ``sharing="cell"``. ``encode_float`` gives the differentiable float forms
    for training; ``encode`` the packed codes for serving. ``BinaryHeads(dims, bits)`` untrained is the
    parameter-free residual sign quantiser, which is what a model without trained heads serves.
    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (config.json + model.safetensors).
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
        self._bits = tuple(check_bits(list(bits)))
        self.dims = tuple(sorted(set(int(d) for d in dims)))
        self.layers = tuple(sorted(set(int(layer) for layer in layers)))
        self.hidden = hidden
        self.sharing = sharing
        if sharing not in SHARING:
            raise UserError(f"sharing: {sharing!r} is not valid; use one of {list(SHARING)}")
        if not self.dims:
            raise UserError("dims: empty; give the cell widths that get binary codes")
        if sharing == "cell" and not self.layers:
            raise UserError("layers: sharing='cell' needs the cell layers to build one head per (layer, dim)")
        for dim in self.dims:
            check_packable(dim)
        steps = self._bits[-1] - 1
        # What save_pretrained writes to config.json (the mixin would drop sets and tuples it cannot encode).
        self._hub_mixin_config = {
            "dims": list(self.dims),
            "bits": list(self._bits),
            "hidden": hidden,
            "sharing": sharing,
            "layers": list(self.layers),
        }
        self.heads = nn.ModuleDict(
            {key: RecurrentBinarizer(dim, steps, hidden) for key, dim in self._head_dims().items()}
        )

    @classmethod
    def parameter_free(cls, dims: Iterable[int], bits: Sequence[int] = (1, 2, 4)) -> BinaryHeads:
        """The residual sign quantiser (1 bit = sign bits) without learned blocks, for models without heads."""
        return cls(dims, bits, hidden=0).eval()

    @property
    def bits(self) -> tuple[int, ...]:
        """The trained depths; ``encode`` serves exactly these."""
        return self._bits

    def _head_dims(self) -> dict[str, int]:
        if self.sharing == "dim":
            return {f"D{dim}": dim for dim in self.dims}
        return {f"L{layer}-D{dim}": dim for layer in self.layers for dim in self.dims}

    def key_for(self, cell: Cell) -> str:
        """The name of the head serving ``cell``: ``D<dim>`` (``sharing="dim"``) or ``L<layer>-D<dim>``."""
        return f"D{cell.dim}" if self.sharing == "dim" else cell.name2d

    def reset_depth(self, key: str, depth: int) -> None:
        """Make the bit planes that head ``key`` adds for trained depth ``depth`` (those beyond the previous
        trained depth; at the first depth, from the encoder block on) parameter-free again: the last layer of
        each block that makes them is zeroed, as in an untrained head. Resetting every depth gives the residual
        sign quantiser exactly."""
        head = self.heads[key]
        previous = max((bits for bits in self._bits if bits < depth), default=0)
        blocks = [head.encoder] if previous == 0 else []
        for step in range(max(previous, 1), depth):
            blocks += [head.decoders[step - 1], head.residuals[step - 1]]
        for block in blocks:
            if block is not None:
                nn.init.zeros_(block[-1].weight)
                nn.init.zeros_(block[-1].bias)

    def head_for(self, cell: Cell) -> RecurrentBinarizer:
        """The head serving ``cell``; UserError when the cell was not trained."""
        key = self.key_for(cell)
        if key not in self.heads:
            trained = [f"D{d}" for d in self.dims] if self.sharing == "dim" else list(self.heads)
            raise UserError(f"cell {cell.name2d} has no binary head; heads were trained for {trained}")
        return self.heads[key]

    def encode_float(self, x: Tensor, cell: Cell) -> list[Tensor]:
        """Float forms ``e_0 .. e_{max(bits)-1}`` of unit embeddings ``x`` (N, cell.dim); differentiable."""
        check_width(x, cell)
        return self.head_for(cell)(x)

    def signs_only(self, cell: Cell) -> bool:
        """Whether ``cell``'s code is the sign bits of its input: 1 bit from a head without an encoder block
        (the parameter-free quantiser). Re-normalising the input then changes nothing."""
        return cell.bits == 1 and self.head_for(cell).encoder is None

    forward = encode_float

    def code_forms(self, embeddings: dict[Cell, list[Tensor]], bits: Sequence[int]) -> dict[Cell, list[Tensor]]:
        """Unit float forms of every float cell's codes at each depth in ``bits``, per input column:
        ``{cell.with_bits(k): [normalize(e_{k-1}(column)) ...]}``; differentiable, for the training losses.
        Their dot products are the code scores (``trainer.binary.codes.code_scores``).

        Each head runs as an activation checkpoint (``torch.utils.checkpoint``): the backward pass recomputes
        its blocks instead of keeping their activations (with its BatchNorm statistics kept), so that the
        memory of a large batch under gradient caching does not grow with the heads' width.
        """
        codes: dict[Cell, list[Tensor]] = {}
        for cell, columns in embeddings.items():
            head = self.head_for(cell)
            forms_of = partial(unit_forms, head, depths=tuple(bits))
            contexts = partial(lambda module: (contextlib.nullcontext(), buffers_kept(module)), head)
            forms = [
                checkpoint(forms_of, column, use_reentrant=False, context_fn=contexts)
                if torch.is_grad_enabled()
                else forms_of(column)
                for column in columns
            ]
            for i, depth in enumerate(bits):
                codes[cell.with_bits(depth)] = [f[i] for f in forms]
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

        Runs in eval mode (BatchNorm running statistics, so rows are independent) and restores the previous
        mode afterwards; rows go through in blocks of ``ENCODE_ROWS``, whose intermediates stay in cache.
        """
        self.check_depth(cell.bits)
        head = self.head_for(cell)
        if self.signs_only(cell):  # packed straight from the signs: no float forms needed
            check_width(embeddings, cell)
            return sign_codes(np.asarray(embeddings))
        x = embeddings if isinstance(embeddings, Tensor) else torch.from_numpy(np.asarray(embeddings))
        parameter = next(head.parameters(), None)
        x = x.float() if parameter is None else x.to(parameter.device, parameter.dtype)
        was_training = self.training
        self.eval()
        try:
            planes = [
                planes_from_floats(self.encode_float(F.normalize(block, dim=-1), cell)[: cell.bits]).cpu().numpy()
                for block in x.split(ENCODE_ROWS)
            ]
        finally:
            self.train(was_training)
        return PackedCodes.from_planes(np.concatenate(planes) if planes else np.zeros((0, cell.bits, cell.dim), bool))

    def save(self, checkpoint: str | Path) -> Path:
        """Save into ``<checkpoint>/binary_heads`` (``save_pretrained``: config.json + model.safetensors)."""
        folder = Path(checkpoint) / HEADS_FOLDER
        self.save_pretrained(folder)
        return folder

    @classmethod
    def load(cls, checkpoint: str | Path) -> BinaryHeads | None:
        """The heads saved under ``<checkpoint>/binary_heads``, in eval mode; None when there are none."""
        folder = Path(checkpoint) / HEADS_FOLDER
        if not (folder / "config.json").is_file():
            return None
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints where it loads from
                return cls.from_pretrained(str(folder), strict=True).eval()
        except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as error:
            raise UserError(f"{folder}: cannot load the binarization heads ({type(error).__name__}: {error})") from None
