"""LoRA adapters on the student's transformer, with peft through sentence-transformers' adapter support.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") replaces each targeted linear
layer ``W x`` by ``W x + (alpha / r) B A x`` with ``A`` (r x in) and ``B`` (out x r, zero at the start) the only
trained weights, so training starts from the unchanged model.

- ``add_lora`` puts fresh adapters on a model (``SentenceTransformer.add_adapter``) and freezes everything else.
- A checkpoint of such a model holds only the adapters: ``adapter_model.safetensors`` and
  ``adapter_config.json``, which names the base model; ``SentenceTransformer(dir)`` loads the base model and
  the adapters again (what resuming, ``load(dir)`` and the evaluation do).
- ``merge_lora`` folds them into plain weights, ``W <- W + (alpha / r) B A`` (peft's merge), for ``export``
  and ``publish``: the result is a plain transformers model that loads without peft.
"""

from __future__ import annotations

from pathlib import Path

from sentence_transformers import SentenceTransformer

from trainer.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_lora(model: SentenceTransformer, r: int, alpha: float, dropout: float, target_modules: str | list[str]) -> None:
    """Fresh LoRA adapters on ``model``'s transformer (the recipe's ``model.lora``); only the adapters require
    gradients afterwards."""
    from peft import LoraConfig

    peft_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    try:
        model.add_adapter(peft_config)
    except ValueError as error:  # no transformer module, or no module matching target_modules
        raise UserError(f"model.lora: cannot add LoRA adapters to {model[0].__class__.__name__}: {error}") from None


def has_lora(model: SentenceTransformer) -> bool:
    return bool(getattr(model[0].auto_model, "_hf_peft_config_loaded", False))


def is_adapter_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def merge_lora(model: SentenceTransformer) -> None:
    """Fold every LoRA adapter into the weight it adapts and remove the adapter layers (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    transformer = model[0].auto_model
    adapted = [(name, module) for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent), child, module.get_base_layer())
    transformer._hf_peft_config_loaded = False
    transformer.__dict__.pop("peft_config", None)
    # The key renamings transformers recorded when it loaded the adapters ("base_model.model." prefix) would be
    # re-applied by save_pretrained; without them it saves the model's own format, as for a model made in memory.
    transformer.__dict__.pop("_weight_conversions", None)
