"""A randomly initialised Qwen3-style decoder LLM folder, built offline from a config (no download).

It is what a base LLM checkpoint looks like (``Qwen3ForCausalLM`` weights, ``config.json``, a byte-level
tokenizer with an ``<|endoftext|>`` EOS token and no pad token, no sentence-transformers files), so training
it exercises the whole decoder path: ``configs/tiny-decoder-ci.yaml`` (CI), the tests and the LoRA memory
benchmark use it.

    python tools/tiny_decoder.py runs/tiny-decoder                          # 4 layers, hidden 64
    python tools/tiny_decoder.py runs/decoder-8x512 --layers 8 --hidden 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (GPT-2's byte-level alphabet, no merges) plus the EOS token."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, model_max_length=512)


def build_tiny_decoder(folder: str | Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Write the decoder (``hidden / 16`` heads of 16 dims, 2 key-value groups, MLP 2x hidden) to ``folder``."""
    folder = Path(folder)
    tokenizer = byte_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 16,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the model (a new folder)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64, help="a multiple of 16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {build_tiny_decoder(args.folder, args.layers, args.hidden, args.seed)}")


if __name__ == "__main__":
    main()
