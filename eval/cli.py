"""Command line (``elastic-eval``): ``python -m eval grid --model M --tasks T ... [--config eval.yaml]`` scores
every cell; ``python -m eval pick grid.json --max-bytes 32 [--max-ms-per-query X] [--min-ndcg Y]`` chooses one."""

from __future__ import annotations

import argparse

from trainer.errors import OneLineParser, UserError, run_cli


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    grid = commands.add_parser("grid", help="MTEB retrieval scores of every layer x dim x bits cell")
    grid.add_argument("--config", help="YAML file with the same keys as these flags; flags override it")
    grid.add_argument("--model", help="checkpoint directory or sentence-transformers hub id")
    grid.add_argument("--tasks", nargs="+", help="mteb retrieval task names or BEIR folders, each NAME[:SPLIT]")
    grid.add_argument(
        "--cells",
        nargs="+",
        help="explicit cells: L3-D128 L6-D384 (each at every --bits depth) or L6-D384-B1,L2-D64 (exactly as listed)",
    )
    grid.add_argument("--layers", nargs="+", type=int, help="layer counts (with --dims); default: all")
    grid.add_argument("--dims", nargs="+", type=int, help="dims kept (with --layers); default: 32, 64, ..., D")
    grid.add_argument("--bits", nargs="+", type=int, help="bit depths, 32 = float; default: 32 1")
    grid.add_argument(
        "--codes",
        choices=["trained", "sign"],
        help="binary cells from the checkpoint's trained heads (default) or from the parameter-free residual sign "
        "quantiser (sign bits at 1 bit), the baseline learned codes are compared with",
    )
    grid.add_argument("--rescore", type=int, help="binary cells: re-rank their top 100*M by the float query (0: off)")
    grid.add_argument("--output", help="results folder; default results/<model-slug>")
    grid.add_argument("--batch-size", dest="batch_size", type=int, help="encoding batch size (default 64)")
    grid.add_argument(
        "--max-seq-length", dest="max_seq_length", type=int, help="cut texts at N tokens (default: model's)"
    )
    grid.add_argument("--overwrite", action="store_true", default=None, help="recompute cells already scored")
    grid.add_argument(
        "--store-dtype",
        dest="store_dtype",
        choices=["float32", "float16"],
        help="dtype of the on-disk embedding stores (default float32; float16 halves their size)",
    )
    grid.add_argument(
        "--devices",
        nargs="+",
        help="encode with one worker process per device, e.g. cuda:0 cuda:1 (default: every GPU when several)",
    )
    pick = commands.add_parser("pick", help="the best cells of a grid.json within a size, speed and quality budget")
    pick.add_argument("grid", help="grid.json written by `eval grid` (or its folder)")
    pick.add_argument("--max-bytes", dest="max_bytes", type=float, help="largest bytes per vector")
    pick.add_argument("--max-ms-per-query", dest="max_ms_per_query", type=float, help="slowest ms per query")
    pick.add_argument("--min-ndcg", dest="min_ndcg", type=float, help="lowest nDCG@10 (mean over the grid's tasks)")
    pick.add_argument("--task", help="judge quality and speed on this task of the grid only")
    pick.add_argument("--top", type=int, default=5, help="how many cells to list (default 5)")
    pick.add_argument("--checkpoint", help="checkpoint path for the export commands (default: the grid's model)")
    return parser


def run_pick(args: argparse.Namespace) -> None:
    from eval.pick import load_grid, report

    if args.top < 1:
        raise UserError(f"--top: {args.top} is not valid; give a positive integer")
    grid = load_grid(args.grid)
    print(report(grid, args.max_bytes, args.max_ms_per_query, args.min_ndcg, args.task, args.top, args.checkpoint))


def run(args: argparse.Namespace) -> None:
    """Check every setting (tasks and their data, model folder, cells, numbers, output folder), then load the
    model and score the grid."""
    from eval.config import KEYS, build_request, load_config, merge
    from eval.plots import write_plots
    from eval.report import write_reports
    from eval.runner import load_model, run_grid
    from eval.tasks import resolve_task
    from trainer.serve.checkpoint import model_shape, resolve_model

    config = load_config(args.config) if args.config else {}
    settings = merge(config, {key: getattr(args, key) for key in KEYS})
    for key in ("model", "tasks"):
        if not settings.get(key):
            raise UserError(f"{key}: missing; give --{key} or '{key}:' in the config")
    for spec in settings["tasks"]:
        resolve_task(spec)
    folder = resolve_model(str(settings["model"]))
    request = build_request(settings, *model_shape(str(folder)))
    model = load_model(request.model)
    results = run_grid(request, model)
    written = write_reports(results, request.output) + write_plots(results, request.output)
    print(
        f"{results.scored_cells} cells scored, {len(results.cells) * len(results.tasks) - results.scored_cells} reused"
    )
    for path in written:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "pick":
        run_cli(lambda: run_pick(args))
        return
    run_cli(
        lambda: run(args),
        on_interrupt="the texts encoded and the cells scored so far are kept in the output folder; rerun the same "
        "command to resume",
    )
