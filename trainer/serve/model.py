"""A multi-granularity checkpoint: ``load(path).at("L4-D128-B2").encode(texts)``.

The folder is a plain sentence-transformers model (``SentenceTransformer(path)`` loads the full float
model) plus ``binary_heads/`` when codes were trained and ``elastic_manifest.json``. A cell's vector is
``trainer.cell_vectors``'s one definition, computed by running only the cell's first ``layers`` blocks
(real early exit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from trainer.binary.codes import PackedCodes
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import code_heads, embedding_dim, encode_cell, num_layers
from trainer.errors import UserError
from trainer.grid import Cell
from trainer.manifest import read_manifest
from trainer.serve.checkpoint import resolve_model


@dataclass
class ElasticModel:
    model: SentenceTransformer
    heads: BinaryHeads | None
    manifest: dict | None
    path: str

    def check_cell(self, cell: Cell) -> Cell:
        """The cell if this checkpoint can serve it (binary cells without trained heads: the parameter-free
        residual sign quantiser); a clear error otherwise."""
        cell.check_fits(num_layers(self.model), embedding_dim(self.model))
        if not cell.is_float:
            code_heads(self.heads, cell)
        return cell

    def at(self, cell: str | Cell) -> CellEncoder:
        return CellEncoder(self, self.check_cell(Cell.parse(cell)))


@dataclass
class CellEncoder:
    """Encoder of one cell of an ``ElasticModel``."""

    elastic: ElasticModel
    cell: Cell

    def encode(
        self, texts: list[str], batch_size: int = 32, prompt: str | None = None, prompt_name: str | None = None
    ) -> np.ndarray | PackedCodes:
        """Float32 array (N, dim) of unit vectors for B32 cells, packed codes for binary ones.

        Prompts work as in ``SentenceTransformer.encode``: ``prompt`` is prepended to every text, ``prompt_name``
        names one of the model's prompts, and with neither the model's ``default_prompt_name`` applies."""
        model = self.elastic.model
        if prompt is None:
            prompt_name = prompt_name or model.default_prompt_name
            if prompt_name is not None and prompt_name not in model.prompts:
                raise UserError(f"prompt_name: {prompt_name!r} is not one of the model's prompts {list(model.prompts)}")
            prompt = model.prompts[prompt_name] if prompt_name else None
        return encode_cell(model, texts, self.cell, self.elastic.heads, batch_size, prompt)

    def encode_query(self, texts: list[str], batch_size: int = 32) -> np.ndarray | PackedCodes:
        """``encode`` with the model's ``query`` prompt, if it has one (``SentenceTransformer.encode_query``)."""
        return self.encode(texts, batch_size, prompt=self.elastic.model.prompts.get("query"))

    def encode_document(self, texts: list[str], batch_size: int = 32) -> np.ndarray | PackedCodes:
        """``encode`` with the model's ``document`` prompt, if it has one."""
        return self.encode(texts, batch_size, prompt=self.elastic.model.prompts.get("document"))


def load(path: str | Path, revision: str | None = None, **model_kwargs) -> ElasticModel:
    """Load a checkpoint folder or Hub repo (any sentence-transformers model works)."""
    local = resolve_model(str(path), key="checkpoint", revision=revision)
    model = SentenceTransformer(str(local), **model_kwargs)
    return ElasticModel(model, BinaryHeads.load(local), read_manifest(local), str(path))
