"""WiSE-FT: weight-space ensembling of the fine-tuned encoder with the model it started from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from trainer.errors import UserError
from trainer.manifest import MANIFEST_NAME, read_manifest
from trainer.settings import build_dataclass
from trainer.train.recipe import ModelConfig, check_alpha

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
        start = base_state[name].to(device=value.device)
        if not torch.equal(start, value):  # frozen weights stay bit for bit
            merged[name] = (alpha * value.float() + (1 - alpha) * start.float()).to(value.dtype)
    tuned.load_state_dict(merged, strict=False)


def wise_ft_checkpoint(
    checkpoint: str | Path, alpha: float, out: str | Path, base: str | None = None, overwrite: bool = False
) -> Path:
    """``python -m trainer wise-ft``: a trained checkpoint with its encoder pulled toward its starting model
    (``interpolate_with_base``), written as a new checkpoint, so that ``alpha`` can be chosen after training
    on a dev set, as Wortsman et al. do. ``base`` defaults to the manifest's base model at the recipe's
    revision (another ``base`` loads at its own). LoRA adapters are merged first (the result holds plain
    weights); heads and the manifest are kept, the manifest's recipe recording ``wise_ft.alpha``. Everything
    is checked before a model loads."""
    from trainer.lora import has_lora, merge_lora
    from trainer.serve.checkpoint import model_shape, resolve_model
    from trainer.serve.export import check_output_folder
    from trainer.serve.model import load
    from trainer.train.student import load_model

    out = Path(out)
    check_alpha(alpha, "--alpha")
    check_output_folder(out, overwrite)
    folder = resolve_model(str(checkpoint), key="checkpoint")
    manifest = read_manifest(folder) or {}
    recipe = manifest.get("recipe") or {}
    if recipe.get("wise_ft"):
        raise UserError(
            f"checkpoint: {checkpoint} is already merged (wise_ft.alpha {recipe['wise_ft'].get('alpha')}); "
            "merge the checkpoint training wrote instead"
        )
    other_base = base is not None and base != manifest.get("base_model")
    base = base or manifest.get("base_model")
    if not base:
        raise UserError(f"--base: {checkpoint} has no {MANIFEST_NAME} naming its base model; pass --base <model>")
    tuned_shape, base_shape = model_shape(str(folder), key="checkpoint"), model_shape(base, key="--base")
    if tuned_shape != base_shape:
        raise UserError(
            f"--base: {base} has {base_shape[0]} layers x {base_shape[1]} dims, the checkpoint "
            f"{tuned_shape[0]} x {tuned_shape[1]}; give the model training started from"
        )
    # The recipe's revision pins the model training started from; another --base brings its own.
    dropped = {"lora", "revision"} if other_base else {"lora"}
    model_settings = {k: v for k, v in (recipe.get("model") or {}).items() if k not in dropped}
    start = load_model(build_dataclass(ModelConfig, {**model_settings, "name": base}, "--base"))
    elastic = load(folder, device="cpu", trust_remote_code=bool(model_settings.get("trust_remote_code")))
    if has_lora(elastic.model):
        merge_lora(elastic.model)
    interpolate_with_base(elastic.model, start, alpha)
    elastic.model.save(str(out))
    if elastic.heads is not None:
        elastic.heads.save(out)
    if manifest:
        manifest["recipe"] = {**recipe, "wise_ft": {"alpha": alpha}}
        manifest["wise_ft_of"] = str(checkpoint)
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
