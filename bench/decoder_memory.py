"""Peak memory of training a decoder-LLM student with LoRA vs full fine-tuning: same model, loss and batch.

The student is a randomly initialised Qwen3-style decoder (``tools/tiny_decoder.py``; 8 layers, hidden 512 by
default) made a last-token embedder (``trainer.decoder``); the loss is ``ElasticLoss`` with two cells and
1-bit heads, as in ``configs/tiny-decoder-ci.yaml``. Each variant runs in a fresh process: load the model,
then ``--steps`` AdamW steps on one batch of (query, document) pairs whose texts fill ``--max-length``
tokens. Reported: trainable parameters, resident memory after loading, peak resident memory (``ru_maxrss``)
and their difference (what training adds: gradients, optimizer state, activations), and the median step time.
Activation (gradient) checkpointing is switched on as the Trainer does for ``activation_checkpointing: true``.

    python bench/decoder_memory.py                  # 8 layers x 512; batches of 2 x 64 and 16 x 128 tokens
    python bench/decoder_memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import markdown, write_result
from tools.tiny_decoder import build_tiny_decoder
from trainer.binary.heads import BinaryHeads
from trainer.grid import Cell, CellSelection, Grid
from trainer.train.losses import ElasticLoss, InfoNCELoss, Matryoshka2dLoss
from trainer.train.losses.binary import BinaryCodeLoss
from trainer.train.recipe import ModelConfig
from trainer.train.student import load_model

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
VARIANTS = {  # name: (LoRA, activation checkpointing)
    "full fine-tuning": (False, False),
    "full fine-tuning + checkpointing": (False, True),
    "LoRA r=16": (True, False),
    "LoRA r=16 + checkpointing": (True, True),
}


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(folder: str, variant: str, batch: int, length: int, steps: int) -> dict:
    """Run ``steps`` training steps of ``variant`` in this process; its memory and time."""
    lora, checkpointing = VARIANTS[variant]
    torch.manual_seed(0)
    model = load_model(ModelConfig(folder, max_seq_length=length, lora=dict(LORA) if lora else None))
    if checkpointing:
        model[0].auto_model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    width, depth = model.get_embedding_dimension(), model[0].auto_model.config.num_hidden_layers
    cells = [Cell(depth // 2, width // 2), Cell(depth, width)]
    heads = BinaryHeads(dims=[c.dim for c in cells], bits=[1], hidden=256)
    terms = {"matryoshka": Matryoshka2dLoss(InfoNCELoss()), "binary": BinaryCodeLoss(heads, (1,), InfoNCELoss())}
    loss = ElasticLoss(model, CellSelection(Grid.from_spec(cells=cells), cells[-1], "starbucks"), terms, heads, (1,))
    trainable = [p for p in loss.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    filler = " the flow of air over a swept wing at high speed" * (length // 16 + 1)
    features = [
        model.preprocess([f"query {i}:{filler}" for i in range(batch)], prompt=model.prompts.get("query")),
        model.preprocess([f"document {i}:{filler}" for i in range(batch)]),
    ]
    loaded = resident_mib()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        value = sum(loss([dict(f) for f in features], None).values())
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "trainable params (M)": sum(p.numel() for p in trainable) / 1e6,
        "RSS after load MiB": loaded,
        "peak RSS MiB": peak,
        "training adds MiB": peak - loaded,
        "s/step (median)": statistics.median(seconds[1:] or seconds),
        "tokens per text": features[0]["input_ids"].shape[1],
    }


def measure_in_fresh_process(folder: str, variant: str, batch: int, length: int, steps: int) -> dict:
    code = (
        "import json; from bench.decoder_memory import measure; "
        f"print(json.dumps(measure({folder!r}, {variant!r}, {batch}, {length}, {steps})))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batches", nargs="+", default=["2x64", "16x128"], help="pairs x tokens per text")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.batches, args.steps = 2, 64, ["4x32"], 2
    command = "python " + " ".join(sys.argv)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_decoder(folder, args.layers, args.hidden)
        rows = []
        for spec in args.batches:
            batch, length = (int(n) for n in spec.split("x"))
            for variant in VARIANTS:
                row = {"model": f"{args.layers} layers x {args.hidden}", "batch": spec}
                rows.append(row | measure_in_fresh_process(folder, variant, batch, length, args.steps))
    print(markdown(rows))
    print(write_result("decoder_memory", command, rows, args.smoke))


if __name__ == "__main__":
    main()
