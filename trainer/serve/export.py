"""Export one cell of a checkpoint as a standalone sentence-transformers model.

The blocks after ``cell.layers`` are physically removed (``num_hidden_layers`` updated). The cell's
re-normalised prefix is built from sentence-transformers' own modules: a bias-free ``Dense`` whose weight is
the identity on the first ``cell.dim`` dims (an exact copy of them) and a ``Normalize``; ``truncate_dim``
is set to match. A float cell therefore loads with a plain ``SentenceTransformer(dir)``. A binary cell adds
a ``BinaryCodeHead`` that outputs the code's float form, which needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize
from torch import nn

from trainer.binary.module import BinaryCodeHead
from trainer.cell_vectors import embedding_dim, keep_layers
from trainer.errors import UserError
from trainer.grid import Cell
from trainer.serve.model import load

EXPORT_INFO = "elastic_cell.json"


def prefix_modules(width: int, dim: int) -> list[nn.Module]:
    """``Dense`` copying the first ``dim`` of ``width`` dims exactly, then ``Normalize``."""
    identity = torch.eye(dim, width)
    return [Dense(width, dim, bias=False, activation_function=nn.Identity(), init_weight=identity), Normalize()]


def export_cell(checkpoint: str | Path, cell: str | Cell, out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: {str(out)!r} is not empty; choose a new folder or pass --overwrite")
    elastic = load(checkpoint)
    cell = elastic.check_cell(Cell.parse(cell, key="--cell"))
    model = elastic.model
    keep_layers(model, cell.layers)
    modules = [*model.children(), *prefix_modules(embedding_dim(model), cell.dim)]
    if not cell.is_float:
        head = elastic.heads.head_for(cell)
        modules.append(BinaryCodeHead.from_trained(head, cell.bits, elastic.heads.hidden))
    exported = SentenceTransformer(
        modules=modules,
        truncate_dim=cell.dim,
        prompts=model.prompts,
        default_prompt_name=model.default_prompt_name,
        similarity_fn_name=model.similarity_fn_name,
    )
    exported.save(str(out))
    info = {"cell": str(cell), "source": str(checkpoint), "base_model": (elastic.manifest or {}).get("base_model")}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out
