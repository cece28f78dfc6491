"""The granularity grid: one cell is (layers kept, leading dims kept, bits per dim).

Canonical text form: ``L4-D128-B1`` (4 transformer layers, the first 128 dims, 1 bit per dim).
``B32`` means float32, and ``L4-D128`` is shorthand for ``L4-D128-B32``. Training, evaluation,
export and publishing all parse and validate cells here and nowhere else (``Cell.parse`` for one cell,
``parse_cells`` for a list in any form a user types), and ``CellSelection`` says which cells a
training step uses.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from trainer.errors import UserError

FLOAT_BITS = 32
MAX_CODE_BITS = 16
_CELL_PATTERN = re.compile(r"^L(\d+)-D(\d+)(?:-B(\d+))?$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Cell:
    """A sub-model: the first ``layers`` transformer layers, the first ``dim`` output dims, ``bits`` per dim."""

    layers: int
    dim: int
    bits: int = FLOAT_BITS

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise UserError(f"cell {self}: layers must be >= 1, got {self.layers}")
        if self.dim < 1:
            raise UserError(f"cell {self}: dim must be >= 1, got {self.dim}")
        if not (1 <= self.bits <= MAX_CODE_BITS or self.bits == FLOAT_BITS):
            raise UserError(
                f"cell {self}: bits must be 1..{MAX_CODE_BITS} (binary codes) or {FLOAT_BITS} (float), got {self.bits}"
            )

    def __str__(self) -> str:
        return f"L{self.layers}-D{self.dim}-B{self.bits}"

    @classmethod
    def parse(cls, text: str | Cell, key: str = "cell") -> Cell:
        """Parse ``L4-D128-B1`` / ``L4-D128``; ``key`` names the config key in error messages."""
        if isinstance(text, Cell):
            return text
        match = _CELL_PATTERN.match(str(text).strip())
        if match is None:
            raise UserError(
                f"{key}: {text!r} is not a cell; expected the form L<layers>-D<dims>[-B<bits>], e.g. L4-D128-B1"
            )
        layers, dim, bits = match.groups()
        return cls(int(layers), int(dim), int(bits) if bits else FLOAT_BITS)

    @property
    def name2d(self) -> str:
        """The (layer, dim) part, ``L4-D128``: the name of a float cell in loss logs."""
        return f"L{self.layers}-D{self.dim}"

    @property
    def is_float(self) -> bool:
        return self.bits == FLOAT_BITS

    @property
    def bytes_per_vector(self) -> float:
        """Storage of one vector: float32 for B32, ``dim * bits / 8`` for codes."""
        return self.dim * self.bits / 8

    def with_bits(self, bits: int) -> Cell:
        return Cell(self.layers, self.dim, bits)

    def check_fits(self, num_layers: int, embedding_dim: int, key: str = "cell") -> None:
        """Raise UserError when the cell asks for more layers or dims than the model has."""
        if self.layers > num_layers:
            raise UserError(
                f"{key}: {self} keeps {self.layers} layers but the model has {num_layers} (valid: 1..{num_layers})"
            )
        if self.dim > embedding_dim:
            raise UserError(
                f"{key}: {self} keeps {self.dim} dims but the model embeds in {embedding_dim} "
                f"(valid: 1..{embedding_dim})"
            )


def _strictly_increasing(values: Sequence[int], key: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values:
        raise UserError(f"{key}: empty list; give at least one value")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise UserError(f"{key}: {list(values)} must be strictly increasing, e.g. [32, 64, 128]")
    return values


@dataclass(frozen=True)
class Grid:
    """The (layer, dim) cells a run trains or evaluates and the bit depths of their codes (B32 = float only).

    Every cell is used at every depth of ``bits``, unless the cells were listed with their bits
    (``L6-D384-B1 L2-D64``): then ``listed`` holds exactly those cells (one without ``-B`` is float).
    """

    cells: tuple[Cell, ...]
    bits: tuple[int, ...] = (FLOAT_BITS,)
    listed: tuple[Cell, ...] = ()

    def __post_init__(self) -> None:
        if not self.cells:
            raise UserError("cells: empty cell list; give at least one cell, e.g. [L6-D384]")
        if len(set(self.cells)) != len(self.cells):
            raise UserError(f"cells: duplicate cells in {[str(c) for c in self.cells]}")
        if len(set(self.listed)) != len(self.listed):
            raise UserError(f"cells: duplicate cells in {[str(c) for c in self.listed]}")
        for b in self.bits:
            Cell(1, 1, b)  # validates the depth

    @classmethod
    def from_spec(
        cls,
        cells: str | Iterable[str | Sequence[int] | Cell] | None = None,
        layers: Sequence[int] | None = None,
        dims: Sequence[int] | None = None,
        bits: Sequence[int] | None = None,
        default_bits: Sequence[int] = (FLOAT_BITS,),
    ) -> Grid:
        """Either an explicit cell list (any form ``parse_cells`` reads) or the product ``layers x dims``, at
        the depths ``bits`` (``default_bits`` when not given). Cells listed with their bits are used as listed."""
        if cells is not None and (layers is not None or dims is not None):
            raise UserError("cells: give either 'cells' or 'layers' and 'dims', not both")
        if cells is not None:
            parsed = _parse_cells(cells, "cells")
            if any(bits_given for _, bits_given in parsed):
                if bits:
                    raise UserError(
                        "cells: the cells name their bits (e.g. L6-D384-B1), so 'bits' cannot also be given; "
                        "write every cell with its bits, or list L<layers>-D<dims> cells and give 'bits'"
                    )
                listed = tuple(cell for cell, _ in parsed)
                planes = tuple(dict.fromkeys(cell.with_bits(FLOAT_BITS) for cell in listed))
                return cls(planes, tuple(sorted({cell.bits for cell in listed})), listed)
            planar = tuple(cell for cell, _ in parsed)
        elif layers is not None and dims is not None:
            layers = _strictly_increasing(layers, "layers")
            dims = _strictly_increasing(dims, "dims")
            planar = tuple(Cell(layer, dim) for layer in layers for dim in dims)
        else:
            raise UserError("cells: no cells given; set 'cells' (e.g. [L2-D32, L6-D384]) or both 'layers' and 'dims'")
        bit_depths = tuple(sorted(set(int(b) for b in bits or default_bits)))
        return cls(planar, bit_depths)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({c.layers for c in self.cells}))

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(sorted({c.dim for c in self.cells}))

    @property
    def code_bits(self) -> tuple[int, ...]:
        """The binary bit depths (B32 excluded)."""
        return tuple(b for b in self.bits if b != FLOAT_BITS)

    @property
    def full_cell(self) -> Cell:
        """The largest cell: most layers, then most dims."""
        return max(self.cells)

    def all_cells(self) -> list[Cell]:
        """Every (layer, dim, bits) cell of the grid."""
        return list(self.listed) or [c.with_bits(b) for c in self.cells for b in self.bits]

    def check_nested(self) -> None:
        """Starbucks-style lists: both layers and dims strictly increase along the list."""
        _strictly_increasing([c.layers for c in self.cells], "cells (layers)")
        _strictly_increasing([c.dim for c in self.cells], "cells (dims)")

    def check_fits(self, num_layers: int, embedding_dim: int) -> None:
        for cell in self.cells:
            cell.check_fits(num_layers, embedding_dim, key="cells")


def parse_cells(items: str | Iterable[str | Sequence[int] | Cell], key: str = "cells") -> list[Cell]:
    """Cells in every form a user types: ``"L2-D64, L6-D384-B1"``, ``"[L2-D64 L6-D384]"``, a list of such
    strings (``--cells L2-D64,L6-D384 L1-D32``), ``Cell`` objects or ``[layers, dim]`` pairs."""
    return [cell for cell, _ in _parse_cells(items, key)]


def _parse_cells(items: str | Iterable[str | Sequence[int] | Cell], key: str) -> list[tuple[Cell, bool]]:
    """``parse_cells``, each cell with whether its bits were given (``-B<bits>`` or a ``Cell``)."""
    if isinstance(items, (str, Cell)):
        items = [items]
    cells = []
    for item in items:
        if isinstance(item, Cell):
            cells.append((item, True))
        elif isinstance(item, str):
            words = item.replace(",", " ").replace("[", " ").replace("]", " ").split()
            cells += [(Cell.parse(word, key=key), "-B" in word.upper()) for word in words]
        elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(v, int) for v in item):
            cells.append((Cell(int(item[0]), int(item[1])), False))
        else:
            raise UserError(f"{key}: {item!r} is not a cell; use the form L4-D128 (or L4-D128-B1, or [4, 128])")
    if not cells:
        raise UserError(f"{key}: no cells given; e.g. L2-D64, L6-D384")
    return cells


SelectionMode = Literal["starbucks", "2dmse", "grid"]


class CellSelection:
    """Which float cells one training step uses: always every dim of the last layer (plain Matryoshka
    truncation of the full model, ``full.layers`` x every grid dim up to ``full.dim``), plus earlier-layer cells:

    - ``starbucks`` and ``grid``: every earlier-layer cell of the grid, every step (Zhuang et al. 2024,
      "Starbucks: Improved Training for 2D Matryoshka Embeddings"; ``grid`` is every layer x every dim).
    - ``2dmse``: ``n_layers_per_step`` sampled earlier layers, each crossed with the full dim plus
      ``n_dims_per_step`` sampled dims (Li et al. 2024, "2D Matryoshka Sentence Embeddings"). The generator is
      seeded identically on every process, so all ranks train the same cells; its state is part of a
      checkpoint (``state_dict``), so a resumed run samples what an uninterrupted one would.
    """

    def __init__(
        self,
        grid: Grid,
        full: Cell,
        mode: SelectionMode = "starbucks",
        n_layers_per_step: int = 1,
        n_dims_per_step: int = 1,
        seed: int = 42,
    ) -> None:
        self.grid, self.full, self.mode = grid, full, mode
        self.n_layers_per_step, self.n_dims_per_step = n_layers_per_step, n_dims_per_step
        self._random = random.Random(seed)
        self.last_layer = [Cell(full.layers, dim) for dim in sorted({*grid.dims, full.dim}) if dim <= full.dim]

    def earlier_cells(self) -> list[Cell]:
        """The earlier-layer cells of this step."""
        earlier = [cell for cell in self.grid.cells if cell.layers < self.full.layers]
        if self.mode != "2dmse":
            return sorted(earlier)
        prior_layers = sorted({cell.layers for cell in earlier})
        smaller_dims = [dim for dim in self.grid.dims if dim < self.full.dim]
        layers = self._random.sample(prior_layers, min(self.n_layers_per_step, len(prior_layers)))
        dims = [self.full.dim] + self._random.sample(smaller_dims, min(self.n_dims_per_step, len(smaller_dims)))
        return sorted(Cell(layer, dim) for layer in layers for dim in dims)

    def cells_for_step(self) -> list[Cell]:
        return sorted({*self.last_layer, *self.earlier_cells()})

    def state_dict(self) -> dict:
        return {"random": self._random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["random"]
        self._random.setstate((version, tuple(internal), gauss))
