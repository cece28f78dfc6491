"""Run by `accelerate launch` in tests/test_distributed.py: train from a recipe, then record a digest
of this rank's final weights next to the saved model."""

import hashlib
import os
import sys
from pathlib import Path

from trainer.train.run import train_from_recipe


def state_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    trainer = train_from_recipe(sys.argv[1], sys.argv[2:])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(trainer.args.output_dir)
    (out / f"rank{rank}-of-{world}.sha256").write_text(state_digest(trainer.model))
