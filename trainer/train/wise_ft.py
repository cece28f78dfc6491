"""WiSE-FT: weight-space ensembling of the fine-tuned encoder with the model it started from."""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError

# peft's LoRA factors W + s * B @ A: B starts at zero and A at random, so scaling B alone scales the update.
_LORA_A = (".lora_A.", ".lora_embedding_A.")


@torch.no_grad()
def interpolate_with_base(tuned: nn.Module, base: nn.Module, alpha: float) -> None:
    """Set every weight of ``tuned`` to ``alpha * theta_tuned + (1 - alpha) * theta_base``, in place.

    Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (WiSE-FT): the linear path between a
    pre-trained model and its fine-tuned copy keeps the fine-tuning gains on the training distribution
    while losing less of the pre-trained model's quality elsewhere. ``base`` is the student as loaded
    before training, with the same parameter names. Weights training did not change stay as they are.

    LoRA (``model.lora``): the update of each adapted layer is ``s * B @ A`` with ``B`` zero at the start,
    so interpolating ``B`` and keeping the trained ``A`` gives exactly ``W + alpha * s * B @ A``, the
    interpolation of the merged weights.
    """
    base_state = base.state_dict()
    merged = {}
    for name, value in tuned.state_dict().items():
        if not value.is_floating_point() or any(part in name for part in _LORA_A):
            continue
        if name not in base_state or base_state[name].shape != value.shape:
            shape = tuple(value.shape)
            raise UserError(f"wise_ft: the base model has no weight {name!r} of shape {shape} to merge with")
        start = base_state[name].to(device=value.device, dtype=torch.float32)
        merged[name] = (alpha * value.float() + (1 - alpha) * start).to(value.dtype)
    tuned.load_state_dict(merged, strict=False)
