"""Binary codes of a cell: the trained binarization heads when the checkpoint has them, else sign bits.

Without heads only 1-bit cells exist: ``b = sign(e)`` of the normalised float prefix ``e`` (the
parameter-free baseline). Deeper codes need trained heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from trainer.binary.codes import PackedCodes, check_packable, sign_codes
from trainer.errors import UserError
from trainer.grid import Cell

if TYPE_CHECKING:
    from trainer.binary.heads import BinaryHeads


def load_heads(model_path: str) -> BinaryHeads | None:
    """The checkpoint's ``BinaryHeads``; None for a hub id or a checkpoint without ``binary_heads/``."""
    if not Path(model_path).is_dir():
        return None
    from trainer.binary.heads import BinaryHeads

    return BinaryHeads.load(model_path)


def check_codes(cell: Cell, heads: Any | None) -> None:
    """Raise (before any work) when ``cell``'s codes cannot be made: unpackable dim, untrained depth or dim."""
    if cell.is_float:
        return
    if heads is not None:
        heads.check_serves(cell)  # UserError naming the dim rule, the trained depths or the trained cells
        return
    check_packable(cell.dim)
    if cell.bits > 1:
        raise UserError(
            f"bits: {cell} asks for {cell.bits}-bit codes but the model has no binarization heads; "
            "without heads only 1-bit sign codes (B1) and floats (B32) are available"
        )


def codes_for(cell: Cell, embeddings: Tensor, heads: Any | None) -> PackedCodes:
    """Codes of the float cell embeddings (N, cell.dim), already normalised."""
    check_codes(cell, heads)
    if heads is None:
        return sign_codes(embeddings.numpy())
    return heads.encode(embeddings, cell)
