"""A multi-granularity checkpoint: ``load(path).at("L4-D128-B2").encode(texts)``.

The folder is a plain sentence-transformers model (``SentenceTransformer(path)`` loads the full float
model) plus ``binary_heads/`` when codes were trained and ``elastic_manifest.json``. A cell runs only its
first ``layers`` transformer blocks (real early exit), keeps its leading ``dim`` dims (re-normalised) and,
below 32 bits, turns them into packed codes with the binarization head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from sentence_transformers import SentenceTransformer

from trainer.binary.codes import PackedCodes
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import early_exit, embedding_dim, num_layers
from trainer.errors import UserError
from trainer.grid import Cell
from trainer.serve.manifest import read_manifest


@dataclass
class ElasticModel:
    model: SentenceTransformer
    heads: BinaryHeads | None
    manifest: dict | None
    path: str

    def check_cell(self, cell: Cell) -> Cell:
        """The cell if this checkpoint can serve it; a clear error otherwise."""
        cell.check_fits(num_layers(self.model), embedding_dim(self.model))
        if cell.is_float:
            return cell
        if self.heads is None:
            raise UserError(f"{cell}: {self.path} has no binarization heads, so only B32 (float) cells exist")
        self.heads.check_serves(cell)
        return cell

    def at(self, cell: str | Cell) -> CellEncoder:
        return CellEncoder(self, self.check_cell(Cell.parse(cell)))


@dataclass
class CellEncoder:
    """Encoder of one cell of an ``ElasticModel``."""

    elastic: ElasticModel
    cell: Cell

    def encode_float(self, texts: list[str], batch_size: int = 32, **kwargs) -> np.ndarray:
        """The float cell: layer ``cell.layers`` pooled, first ``cell.dim`` dims, unit length."""
        model = self.elastic.model
        with early_exit(model, self.cell.layers):
            embeddings = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, **kwargs)
        return F.normalize(embeddings[:, : self.cell.dim].float(), dim=-1).cpu().numpy()

    def encode(self, texts: list[str], batch_size: int = 32, **kwargs) -> np.ndarray | PackedCodes:
        """Float32 array (N, dim) for B32 cells, packed codes for binary ones."""
        embeddings = self.encode_float(texts, batch_size, **kwargs)
        if self.cell.is_float:
            return embeddings
        return self.elastic.heads.encode(embeddings, self.cell)


def load(path: str | Path, revision: str | None = None, **model_kwargs) -> ElasticModel:
    """Load a checkpoint folder or Hub repo (any sentence-transformers model works: float cells only)."""
    local = Path(path)
    if not local.is_dir():
        local = Path(snapshot_download(str(path), revision=revision))
    model = SentenceTransformer(str(local), **model_kwargs)
    return ElasticModel(model, BinaryHeads.load(local), read_manifest(local), str(path))
