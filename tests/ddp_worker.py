"""Run by `accelerate launch` in tests/test_distributed.py: train from a recipe, then record digests of this
rank's final weights next to the saved model: the encoder (``rank<r>-of-<w>.sha256``) and, per part, the
encoder, the binarization heads and the distillation projection (``rank<r>-of-<w>.json``); the main process
also writes the logged losses (``log_history.json``)."""

import hashlib
import json
import sys
from pathlib import Path

from accelerate import PartialState

from trainer.train.run import train_from_recipe


def digest(named_tensors) -> str:
    hashed = hashlib.sha256()
    for name, tensor in sorted(named_tensors):
        hashed.update(name.encode())
        hashed.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()


def state_digest(model) -> str:
    return digest(model.state_dict().items())


def part_digests(trainer) -> dict[str, str]:
    """Digests of the trained parameters of the encoder and of the loss's heads and projection (the heads'
    BatchNorm running statistics are per process, as in any DDP run without SyncBatchNorm)."""
    loss = trainer.loss
    parts = {"encoder": digest(trainer.model.named_parameters())}
    if loss.heads is not None:
        parts["heads"] = digest(loss.heads.named_parameters())
    distill = loss.terms["distill"] if "distill" in loss.terms else None
    if distill is not None and distill.projection is not None:
        parts["projection"] = digest(distill.projection.named_parameters())
    return parts


if __name__ == "__main__":
    trainer = train_from_recipe(sys.argv[1], sys.argv[2:])
    state = PartialState()
    name = f"rank{state.process_index}-of-{state.num_processes}"
    out = Path(trainer.args.output_dir)
    (out / f"{name}.sha256").write_text(state_digest(trainer.model))
    (out / f"{name}.json").write_text(json.dumps(part_digests(trainer)))
    if state.is_main_process:
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        (out / "log_history.json").write_text(json.dumps(logs))
