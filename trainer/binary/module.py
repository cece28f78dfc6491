"""The sentence-transformers module that carries a binarization head in an exported binary cell.

sentence-transformers imports a module outside its own namespace only with ``trust_remote_code=True``,
so an exported binary cell loads with ``SentenceTransformer(dir, trust_remote_code=True)`` wherever this
package is installed. Float cells need no custom module (see ``trainer.serve.export``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sentence_transformers.base.modules import Module
from torch import Tensor

from trainer.binary.heads import RecurrentBinarizer


class BinaryCodeHead(Module):
    """A recurrent binarization head at one depth; outputs the code's float form ``e_{bits-1}``.

    The float form ``sum_i 2^-i b_i`` carries the code exactly (``trainer.binary.heads.planes_from_floats``
    recovers the planes), and cosine of float forms is the code score used everywhere in this project.
    The module always runs its head in eval mode (BatchNorm running statistics), as at serving time.
    """

    config_keys: list[str] = ["dim", "bits", "hidden"]

    def __init__(self, dim: int, bits: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.bits, self.hidden = dim, bits, hidden
        self.head = RecurrentBinarizer(dim, bits - 1, hidden)

    @classmethod
    def from_trained(cls, head: RecurrentBinarizer, bits: int, hidden: int) -> BinaryCodeHead:
        """Copy the blocks a depth needs (the encoder and the first ``bits - 1`` residual steps)."""
        module = cls(head.dim, bits, hidden)
        if not hidden:  # the residual sign quantiser: nothing to copy
            return module
        module.head.encoder.load_state_dict(head.encoder.state_dict())
        for k in range(bits - 1):
            module.head.decoders[k].load_state_dict(head.decoders[k].state_dict())
            module.head.residuals[k].load_state_dict(head.residuals[k].state_dict())
        return module

    def forward(self, features: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
        self.head.eval()
        x = F.normalize(features["sentence_embedding"], dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.training):
            features["sentence_embedding"] = self.head(x)[self.bits - 1]
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, **kwargs) -> BinaryCodeHead:
        hub = {
            k: kwargs[k] for k in ("subfolder", "token", "cache_folder", "revision", "local_files_only") if k in kwargs
        }
        module = cls(**cls.load_config(model_name_or_path=model_name_or_path, **hub))
        return cls.load_torch_weights(model_name_or_path=model_name_or_path, model=module, **hub)
