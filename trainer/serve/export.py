"""Export one cell of a checkpoint as a standalone sentence-transformers model.

The exported model computes the cell's vector exactly as ``trainer.cell_vectors`` defines it: the blocks
after ``cell.layers`` are physically removed (``num_hidden_layers`` updated; a pre-norm model keeps its final
norm, which then follows the cell's last block), the model's own modules pool, a bias-free ``Dense`` whose
weight is the identity on the first ``cell.dim`` dims copies them exactly and ``Normalize`` re-normalises;
``truncate_dim`` is set to match. LoRA adapters (``trainer.lora``) are merged into the weights first. A float
cell therefore loads with a plain ``SentenceTransformer(dir)``. A binary cell adds a ``BinaryCodeHead`` that
outputs the code's float form (cosine of float forms is the code score), which needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize
from torch import nn
from tqdm.auto import tqdm

from trainer.binary.module import BinaryCodeHead
from trainer.cell_vectors import code_heads, embedding_dim, keep_layers
from trainer.errors import UserError
from trainer.grid import Cell
from trainer.lora import has_lora, merge_lora
from trainer.outputs import check_writable_folder
from trainer.serve.checkpoint import model_shape, resolve_model
from trainer.serve.model import load

EXPORT_INFO = "elastic_cell.json"


def prefix_modules(width: int, dim: int) -> list[nn.Module]:
    """``Dense`` copying the first ``dim`` of ``width`` dims exactly, then ``Normalize``."""
    identity = torch.eye(dim, width)
    return [Dense(width, dim, bias=False, activation_function=nn.Identity(), init_weight=identity), Normalize()]


def check_output_folder(out: Path, overwrite: bool, key: str = "--out") -> None:
    """Refuse a file, a non-empty folder (unless ``overwrite``) or a folder that cannot be written."""
    check_writable_folder(out, key)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{key}: {str(out)!r} is not empty; choose a new folder or pass --overwrite")


def export_cell(checkpoint: str | Path, cell: str | Cell, out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out)
    cell = Cell.parse(cell, key="--cell")
    check_output_folder(out, overwrite)
    folder = resolve_model(str(checkpoint), key="checkpoint")
    cell.check_fits(*model_shape(str(folder), key="checkpoint"), key="--cell")
    steps = tqdm(total=3, desc=f"Exporting {cell}", unit="step")
    elastic = load(folder)
    cell = elastic.check_cell(cell)
    steps.update()
    model = elastic.model
    if has_lora(model):
        merge_lora(model)
    keep_layers(model, cell.layers)
    modules = [*model.children(), *prefix_modules(embedding_dim(model), cell.dim)]
    if not cell.is_float:
        heads = code_heads(elastic.heads, cell)
        modules.append(BinaryCodeHead.from_trained(heads.head_for(cell), cell.bits, heads.hidden))
    exported = SentenceTransformer(
        modules=modules,
        truncate_dim=cell.dim,
        prompts=model.prompts,
        default_prompt_name=model.default_prompt_name,
        similarity_fn_name="cosine",
    )
    steps.update()
    exported.save(str(out))
    info = {"cell": str(cell), "source": str(checkpoint), "base_model": (elastic.manifest or {}).get("base_model")}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    steps.update()
    steps.close()
    return out
