"""Command line: ``python -m trainer {train,export,wise-ft,publish} ...`` (console script ``elastic-train``)."""

from __future__ import annotations

import argparse
import logging

from trainer.errors import OneLineParser, run_cli


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune from a YAML recipe; extra --key value pairs override it")
    train.add_argument("recipe", help="path to a YAML recipe, e.g. configs/demo.yaml")
    export = commands.add_parser("export", help="write one cell as a standalone sentence-transformers model")
    export.add_argument("checkpoint", help="checkpoint folder or hub id")
    export.add_argument("--cell", required=True, help="the cell, e.g. L4-D128-B1 (B32 or no -B = float)")
    export.add_argument("--out", required=True, help="new folder for the exported model")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    wise = commands.add_parser("wise-ft", help="write a checkpoint pulled toward its starting weights (WiSE-FT)")
    wise.add_argument("checkpoint", help="checkpoint folder or hub id written by `train`")
    wise.add_argument("--alpha", type=float, required=True, help="share of the fine-tuned weights, in (0, 1]")
    wise.add_argument("--out", required=True, help="new folder for the merged checkpoint")
    wise.add_argument("--base", help="the model training started from (default: the manifest's base model)")
    wise.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    publish = commands.add_parser("publish", help="upload a checkpoint and its grid model card to the Hub")
    publish.add_argument("checkpoint", help="checkpoint folder written by `train`")
    publish.add_argument("--repo-id", required=True, help="Hub repository, e.g. my-org/minilm-elastic")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument(
        "--cells", nargs="+", help="only these evaluated cells in the card, e.g. L6-D384-B1,L2-D64 (default: all)"
    )
    publish.add_argument("--grid", help="evaluation folder with grid.json and pareto.png (default <ckpt>/eval)")
    publish.add_argument(
        "--dry-run", metavar="DIR", help="write the files that would be uploaded to DIR; upload nothing"
    )
    return parser


def _dispatch(args: argparse.Namespace, overrides: list[str]) -> None:
    if args.command == "train":
        from trainer.train.run import train_from_recipe

        train_from_recipe(args.recipe, overrides)
    elif args.command == "export":
        from trainer.serve.export import export_cell

        print(f"wrote {export_cell(args.checkpoint, args.cell, args.out, args.overwrite)}")
    elif args.command == "wise-ft":
        from trainer.train.wise_ft import wise_ft_checkpoint

        print(f"wrote {wise_ft_checkpoint(args.checkpoint, args.alpha, args.out, args.base, args.overwrite)}")
    elif args.command == "publish":
        from trainer.serve.publish import publish

        files = publish(args.checkpoint, args.repo_id, args.private, args.cells, args.grid, args.dry_run)
        where = f"in {args.dry_run} (dry run, nothing uploaded)" if args.dry_run else f"to {args.repo_id}"
        print(f"{len(files)} files {where}: " + ", ".join(files))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)  # this project's progress lines and summaries
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command != "train" and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    resume = {
        "train": "checkpoints written so far are kept; rerun with --resume_from_checkpoint true to continue",
        "export": "the output folder may be incomplete; rerun with --overwrite",
        "wise-ft": "the output folder may be incomplete; rerun with --overwrite",
        "publish": "nothing was uploaded unless the upload had finished",
    }[args.command]
    run_cli(lambda: _dispatch(args, overrides), on_interrupt=resume)
