"""Train elastic (layers x dims) and binarized text-embedding models on sentence-transformers."""

from trainer.errors import UserError
from trainer.grid import Cell, Grid

__all__ = ["Cell", "Grid", "UserError"]
