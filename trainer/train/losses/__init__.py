"""Loss modules. ``ElasticLoss`` is what the Trainer calls; it runs the model once per input column and
hands every selected cell's embeddings to its terms (2D Matryoshka, binary codes, distillation)."""

from trainer.train.losses.elastic import CellBatch, ElasticLoss
from trainer.train.losses.infonce import InfoNCELoss
from trainer.train.losses.matryoshka2d import Matryoshka2dLoss

__all__ = ["CellBatch", "ElasticLoss", "InfoNCELoss", "Matryoshka2dLoss"]
