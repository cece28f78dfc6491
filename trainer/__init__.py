"""Train elastic (layers x dims) and binarized text-embedding models on sentence-transformers."""

from trainer.grid import Cell, Grid, GridError

__all__ = ["Cell", "Grid", "GridError"]
