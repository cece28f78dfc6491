"""The comparison a user would pick instead: sentence-transformers' Matryoshka2dLoss (one sampled layer and
dim per step, Li et al. 2024) around MultipleNegativesRankingLoss, trained on the same pairs with the same
steps, batch and learning rate as a recipe of ours. Binary cells of the result come from sign bits
(= ``quantize_embeddings(..., "ubinary")``), which is what the evaluation does for a model without heads.

    python bench/st_baseline.py configs/flagship.yaml runs/flagship/st-matryoshka2d [--max_steps 2 ...]

Label-free ``texts`` sources are skipped: MultipleNegativesRankingLoss needs pairs.
"""

from __future__ import annotations

import argparse

from datasets import DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import Matryoshka2dLoss, MultipleNegativesRankingLoss

from trainer.serve.checkpoint import model_shape
from trainer.train.data import load_sources
from trainer.train.recipe import load_recipe

TRAINING_KEYS = ("max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps", "batch_sampler", "seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("output_dir")
    args, overrides = parser.parse_known_args()
    recipe = load_recipe(args.recipe, overrides)
    pairs = [source for source in recipe.data.train if not source.texts]
    data = load_sources(pairs)
    model = SentenceTransformer(recipe.model.name)
    model.max_seq_length = recipe.model.max_seq_length or model.max_seq_length
    grid = recipe.loss.grid(*model_shape(recipe.model.name, recipe.model.revision))
    dims = sorted({*grid.dims, model.get_embedding_dimension()}, reverse=True)
    loss = Matryoshka2dLoss(model, MultipleNegativesRankingLoss(model), dims)
    training = {key: recipe.training[key] for key in TRAINING_KEYS if key in recipe.training}
    trainer_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, save_strategy="no", logging_steps=10, report_to="none", **training
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=trainer_args, train_dataset=data if isinstance(data, DatasetDict) else data, loss=loss
    )
    trainer.train()
    model.save(args.output_dir)


if __name__ == "__main__":
    main()
