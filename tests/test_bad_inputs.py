"""Every user mistake, through the real command lines: exit code 2, one line ``error: ...`` on stderr naming
the key or file and the value, no traceback, existing outputs untouched and nothing new written (issue 16).

Each case runs in its own process, forked from a server that imported the command lines' libraries once
(``tests.cli_process``), so a hundred cases take seconds instead of a hundred imports of torch. Every case must
fail before a model loads: a case that runs past ``TIMEOUT_S`` fails the test. ``test_forked_runs_match_python_m``
runs some cases with ``python -m`` to show that the forked runs behave as the real command does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cli_process import ForkedCli
from tests.conftest import REPO

TIMEOUT_S = 120  # generous for a loaded machine; a case that loads a model and trains would still exceed it
SPLITS = ("train", "test")


def write_beir(folder: Path, docs: int = 20) -> Path:
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": f"d{i}", "title": f"title {i}", "text": f"document {i} about topic {i % 5}"} for i in range(docs)]
    queries = [{"_id": f"q{i}", "text": f"what is topic {i}"} for i in range(5)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split in SPLITS:
        rows = "".join(f"q{i}\td{i}\t1\n" for i in range(5))
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return folder


def broken_beir(root: Path, name: str, file: str, text: str | bytes) -> None:
    folder = write_beir(root / name)
    path = folder / file
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def copy_model(source: Path, target: Path, manifest: bool = True) -> Path:
    shutil.copytree(source, target)
    if manifest:
        manifest_data = {
            "format_version": 1,
            "base_model": "tiny-bert",
            "num_layers": 4,
            "embedding_dim": 32,
            "loss": "starbucks",
            "cells": ["L2-D16", "L4-D32"],
            "bits": [32],
        }
        (target / "elastic_manifest.json").write_text(json.dumps(manifest_data))
    return target


def recipe(**edits) -> dict:
    base = {
        "model": {"name": "tiny"},
        "data": {"train": [{"path": "pairs.jsonl"}]},
        "loss": {"type": "starbucks", "cells": ["L1-D8", "L2-D16"]},
        "training": {"output_dir": "runs/new", "max_steps": 1, "per_device_train_batch_size": 2, "report_to": "none"},
    }
    for dotted, value in edits.items():
        section, _, key = dotted.partition("__")
        if key:
            base[section][key] = value
        else:
            base[section] = value
    return base


RECIPES = {
    "good": recipe(),
    "training_lr_text": recipe(training__learning_rate="abc"),
    "training_batch_text": recipe(training__per_device_train_batch_size="8x"),
    "training_no_output": recipe(training={"max_steps": 1}),
    "unknown_section": recipe(lossy={"type": "grid"}),
    "lr_negative": recipe(training__save_strategy="no", training__learning_rate="-1e-4"),
    "pairs_broken": recipe(data={"train": [{"path": "pairs_broken.jsonl"}]}),
    "pairs_empty": recipe(data={"train": [{"path": "pairs_empty.jsonl"}]}),
    "pairs_latin1": recipe(data={"train": [{"path": "pairs_latin1.jsonl"}]}),
    "pairs_not_object": recipe(data={"train": [{"path": "pairs_list.jsonl"}]}),
    "pairs_missing_column": recipe(
        data={"train": [{"path": "pairs.jsonl", "columns": {"anchor": "q", "positive": "d"}}]}
    ),
    "pairs_txt": recipe(data={"train": [{"path": "pairs.txt"}]}),
    "beir_badjson": recipe(data={"train": [{"beir": "beir_badjson"}]}),
    "beir_noid": recipe(data={"train": [{"beir": "beir_noid"}]}),
    "beir_latin1": recipe(data={"train": [{"beir": "beir_latin1"}]}),
    "beir_score": recipe(data={"train": [{"beir": "beir_score"}]}),
    "beir_short": recipe(data={"train": [{"beir": "beir_short"}]}),
    "beir_misspelt": recipe(data={"train": [{"beir": "bier"}]}),
    "beir_no_split": recipe(data={"train": [{"beir": "beir", "split": "dev"}]}),
    "texts_without_distill": recipe(data={"train": [{"texts": "beir"}]}),
    "texts_badjson": recipe(
        data={"train": [{"texts": "beir_badjson"}]}, distill={"teacher": "self", "cache_dir": "teacher_cache"}
    ),
}


def build_workspace(root: Path, tiny_model: Path) -> None:
    copy_model(tiny_model, root / "tiny", manifest=False)
    copy_model(tiny_model, root / "ckpt")
    truncated = copy_model(tiny_model, root / "ckpt_truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (copy_model(tiny_model, root / "ckpt_badconfig") / "config.json").write_text("{not json")
    (copy_model(tiny_model, root / "ckpt_badmanifest") / "elastic_manifest.json").write_text("{")
    (root / "not_model").mkdir()
    (root / "not_model" / "notes.txt").write_text("not a model")
    (root / "afile.txt").write_text("a file, not a folder")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine")
    (root / "existing_run").mkdir()
    (root / "existing_run" / "model.safetensors").write_text("precious")
    (root / "eval_out").mkdir()
    (root / "eval_out" / "grid.json").write_text("kept")
    for name in ("grid", "grid_bad", "grid_empty"):
        (root / name).mkdir()
    cells = [{"cell": "L2-D16-B32", "layers": 2, "dim": 16, "bits": 32, "bytes_per_vector": 64, "scores": {}}]
    (root / "grid" / "grid.json").write_text(json.dumps({"tasks": [], "cells": cells}))
    (root / "grid_bad" / "grid.json").write_text("{")

    write_beir(root / "beir")
    broken_beir(root, "beir_badjson", "corpus.jsonl", '{"_id": "d0", "text": "ok"}\n{"_id": "d1", "text": \n')
    broken_beir(root, "beir_noid", "corpus.jsonl", '{"_id": "d0", "text": "ok"}\n{"text": "no id"}\n')
    broken_beir(root, "beir_latin1", "queries.jsonl", b'{"_id": "q0", "text": "caf\xe9"}\n')
    broken_beir(root, "beir_score", "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq0\td0\thigh\n")
    broken_beir(root, "beir_short", "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1 d1 1\n")
    broken_beir(root, "beir_noheader", "qrels/test.tsv", "q0\td0\t1\n")
    broken_beir(root, "beir_empty", "corpus.jsonl", "")
    broken_beir(root, "beir_notext", "queries.jsonl", '{"_id": "q0", "title": "no text"}\n')
    for name in ("beir_score", "beir_short"):  # the training cases read the train split
        shutil.copy(root / name / "qrels" / "test.tsv", root / name / "qrels" / "train.tsv")

    pairs = "".join(json.dumps({"anchor": f"question {i}", "positive": f"answer {i}"}) + "\n" for i in range(16))
    (root / "pairs.jsonl").write_text(pairs)
    (root / "pairs.txt").write_text(pairs)
    (root / "pairs_broken.jsonl").write_text(pairs[:200] + '\n{"anchor": "x", "positive": \n' + pairs[200:])
    (root / "pairs_empty.jsonl").write_text("\n")
    (root / "pairs_latin1.jsonl").write_bytes(pairs.encode() + b'{"anchor": "caf\xe9", "positive": "x"}\n')
    (root / "pairs_list.jsonl").write_text(pairs + '["anchor", "positive"]\n')

    (root / "recipes").mkdir()
    for name, content in RECIPES.items():
        (root / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(content))
    (root / "recipes" / "not_yaml.yaml").write_text("model:\n  name: tiny\n data: [\n")
    (root / "recipes" / "a_list.yaml").write_text("- model\n- data\n")
    (root / "recipes" / "latin1.yaml").write_bytes(b"model:\n  name: caf\xe9\n")
    (root / "eval_not_yaml.yaml").write_text("model: [tiny\n")
    (root / "eval_unknown_key.yaml").write_text("model: tiny\nbatchsize: 8\n")
    (root / "eval_batch_text.yaml").write_text("model: tiny\nbatch_size: eight\n")


TRAIN = ["trainer", "train"]
GOOD = ["recipes/good.yaml"]
EVAL = ["eval", "grid", "--model", "tiny", "--output", "eval_out"]
TASK = ["--tasks", "beir:test"]
EXPORT = ["trainer", "export", "ckpt", "--out", "exported"]


def export(checkpoint: str = "ckpt", out: str = "exported") -> list[str]:
    return ["trainer", "export", checkpoint, "--cell", "L2-D8", "--out", out]


WISE_FT = ["trainer", "wise-ft", "ckpt", "--out", "merged"]
PUBLISH = ["trainer", "publish", "ckpt", "--repo-id", "my-org/tiny", "--dry-run", "dry"]
REPO_ID = ["trainer", "publish", "ckpt", "--dry-run", "dry", "--repo-id"]

# (id, module and arguments, substrings the one error line must contain)
CASES: list[tuple[str, list[str], list[str]]] = [
    # trainer train: training arguments, typed and checked before anything loads
    ("lr_negative", [*TRAIN, *GOOD, "--learning_rate", "-1"], ["--learning_rate", "-1.0", "> 0"]),
    ("lr_text", [*TRAIN, *GOOD, "--learning_rate", "abc"], ["--learning_rate", "'abc'", "a number"]),
    ("batch_zero", [*TRAIN, *GOOD, "--per_device_train_batch_size", "0"], ["per_device_train_batch_size", ">= 1"]),
    ("batch_text", [*TRAIN, *GOOD, "--per_device_train_batch_size", "thirty"], ["'thirty'", "an integer"]),
    ("max_steps_text", [*TRAIN, *GOOD, "--max_steps", "two"], ["--max_steps", "'two'", "an integer"]),
    ("max_steps_fraction", [*TRAIN, *GOOD, "--max_steps", "2.5"], ["--max_steps", "'2.5'", "an integer"]),
    ("max_steps_zero", [*TRAIN, *GOOD, "--max_steps", "0"], ["--max_steps", "-1"]),
    ("epochs_zero", [*TRAIN, *GOOD, "--num_train_epochs", "0"], ["--num_train_epochs", "> 0"]),
    ("accumulation_zero", [*TRAIN, *GOOD, "--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps"]),
    ("warmup_negative", [*TRAIN, *GOOD, "--warmup_steps", "-2"], ["--warmup_steps", ">= 0"]),
    ("seq_len_text", [*TRAIN, *GOOD, "--model.max_seq_length", "abc"], ["--model.max_seq_length", "'abc'"]),
    ("save_strategy_bad", [*TRAIN, *GOOD, "--save_strategy", "nope"], ["--save_strategy", "'nope'", "no, steps"]),
    ("eval_strategy_bad", [*TRAIN, *GOOD, "--eval_strategy", "maybe"], ["--eval_strategy", "'maybe'", "epoch"]),
    ("scheduler_bad", [*TRAIN, *GOOD, "--lr_scheduler_type", "cosin"], ["--lr_scheduler_type", "cosine"]),
    ("hub_strategy_bad", [*TRAIN, *GOOD, "--hub_strategy", "sometimes"], ["--hub_strategy", "every_save"]),
    ("optim_bad", [*TRAIN, *GOOD, "--optim", "adamw_typo"], ["--optim", "'adamw_typo'"]),
    ("report_to_bad", [*TRAIN, *GOOD, "--report_to", "nobody"], ["nobody", "not supported"]),
    ("bool_bad", [*TRAIN, *GOOD, "--bf16", "maybe"], ["--bf16", "'maybe'", "true or false"]),
    ("best_model_mismatch", [*TRAIN, *GOOD, "--load_best_model_at_end", "yes"], ["load_best_model_at_end"]),
    ("unknown_argument", [*TRAIN, *GOOD, "--learning_rat", "1e-4"], ["--learning_rat", "did you mean"]),
    ("unknown_section", [*TRAIN, *GOOD, "--lossy.type", "grid"], ["--lossy.type", "did you mean 'loss'"]),
    ("unknown_loss_key", [*TRAIN, *GOOD, "--loss.tpye", "grid"], ["--loss.tpye", "did you mean 'type'"]),
    ("missing_value", [*TRAIN, *GOOD, "--learning_rate"], ["--learning_rate needs a value"]),
    ("stray_token", [*TRAIN, *GOOD, "stray"], ["expected --key value", "'stray'"]),
    ("list_for_scalar", [*TRAIN, *GOOD, "--max_steps", "1", "2"], ["--max_steps", "an integer"]),
    ("loss_type_bad", [*TRAIN, *GOOD, "--loss.type", "matryoshka"], ["loss.type", "'matryoshka'", "starbucks"]),
    ("loss_scale_zero", [*TRAIN, *GOOD, "--loss.scale", "0"], ["loss.scale", "> 0"]),
    ("loss_cells_code_bits", [*TRAIN, *GOOD, "--loss.cells", "L1-D8,L2-D16-B1"], ["loss.cells", "binary.bits"]),
    ("loss_cells_too_deep", [*TRAIN, *GOOD, "--loss.cells", "L1-D8", "L9-D16"], ["loss.cells", "9 layers", "1..4"]),
    ("loss_cells_malformed", [*TRAIN, *GOOD, "--loss.cells", "L1D8"], ["'L1D8' is not a cell", "L4-D128"]),
    ("binary_bits_text", [*TRAIN, *GOOD, "--binary.bits", "one"], ["--binary.bits[0]", "'one'", "an integer"]),
    ("binary_bits_range", [*TRAIN, *GOOD, "--binary.bits", "1,40"], ["binary.bits", "40", "1..16"]),
    ("wise_ft_zero", [*TRAIN, *GOOD, "--wise_ft.alpha", "0"], ["wise_ft.alpha", "0.0", "(0, 1]"]),
    ("wise_ft_above_one", [*TRAIN, *GOOD, "--wise_ft.alpha", "1.5"], ["wise_ft.alpha", "1.5", "(0, 1]"]),
    ("wise_ft_text", [*TRAIN, *GOOD, "--wise_ft.alpha", "half"], ["--wise_ft.alpha", "'half'", "a number"]),
    (
        "wise_ft_head_only",
        [*TRAIN, *GOOD, "--binary.mode", "head-only", "--wise_ft.alpha", "0.5"],
        ["wise_ft", "head-only", "nothing to merge"],
    ),
    ("output_is_file", [*TRAIN, *GOOD, "--output_dir", "afile.txt"], ["training.output_dir", "afile.txt", "file"]),
    ("output_not_writable", [*TRAIN, *GOOD, "--output_dir", "/proc/elastic-run"], ["output_dir", "/proc"]),
    ("output_holds_run", [*TRAIN, *GOOD, "--output_dir", "existing_run"], ["existing_run", "already holds a run"]),
    (
        "resume_nothing",
        [*TRAIN, *GOOD, "--resume_from_checkpoint", "true"],
        ["resume_from_checkpoint", "no complete checkpoint"],
    ),
    ("model_missing", [*TRAIN, *GOOD, "--model.name", "./no-such-model"], ["model.name", "no-such-model"]),
    ("recipe_missing", [*TRAIN, "recipes/nope.yaml"], ["recipes/nope.yaml", "does not exist"]),
    ("recipe_not_yaml", [*TRAIN, "recipes/not_yaml.yaml"], ["not_yaml.yaml", "not valid YAML", "line 3"]),
    ("recipe_a_list", [*TRAIN, "recipes/a_list.yaml"], ["a_list.yaml", "mapping"]),
    ("recipe_not_utf8", [*TRAIN, "recipes/latin1.yaml"], ["latin1.yaml", "not UTF-8"]),
    ("recipe_lr_text", [*TRAIN, "recipes/training_lr_text.yaml"], ["training.learning_rate", "'abc'", "a number"]),
    ("recipe_batch_text", [*TRAIN, "recipes/training_batch_text.yaml"], ["per_device_train_batch_size", "'8x'"]),
    ("recipe_no_output_dir", [*TRAIN, "recipes/training_no_output.yaml"], ["training.output_dir: missing"]),
    ("recipe_unknown_section", [*TRAIN, "recipes/unknown_section.yaml"], ["lossy", "did you mean 'loss'"]),
    ("recipe_lr_negative", [*TRAIN, "recipes/lr_negative.yaml"], ["training.learning_rate", "-0.0001"]),
    # trainer train: data files, named with the line, before the model loads
    ("pairs_broken_json", [*TRAIN, "recipes/pairs_broken.yaml"], ["pairs_broken.jsonl:", "not valid JSON"]),
    ("pairs_empty", [*TRAIN, "recipes/pairs_empty.yaml"], ["pairs_empty.jsonl", "empty"]),
    ("pairs_not_utf8", [*TRAIN, "recipes/pairs_latin1.yaml"], ["pairs_latin1.jsonl:17", "not UTF-8"]),
    ("pairs_not_object", [*TRAIN, "recipes/pairs_not_object.yaml"], ["pairs_list.jsonl:17", "JSON object"]),
    (
        "pairs_missing_column",
        [*TRAIN, "recipes/pairs_missing_column.yaml"],
        ["columns.anchor", "'q'", "not in the dataset"],
    ),
    ("pairs_unknown_format", [*TRAIN, "recipes/pairs_txt.yaml"], ["pairs.txt", "unknown format"]),
    ("beir_broken_json", [*TRAIN, "recipes/beir_badjson.yaml"], ["corpus.jsonl:2", "not valid JSON"]),
    ("beir_record_without_id", [*TRAIN, "recipes/beir_noid.yaml"], ["corpus.jsonl:2", "no _id"]),
    ("beir_not_utf8", [*TRAIN, "recipes/beir_latin1.yaml"], ["queries.jsonl:1", "not UTF-8"]),
    ("beir_score_text", [*TRAIN, "recipes/beir_score.yaml"], ["train.tsv:2", "'high'", "not a number"]),
    ("beir_short_row", [*TRAIN, "recipes/beir_short.yaml"], ["train.tsv:3", "query-id<TAB>corpus-id<TAB>score"]),
    ("beir_misspelt", [*TRAIN, "recipes/beir_misspelt.yaml"], ["'bier'", "did you mean 'beir'"]),
    ("beir_no_split", [*TRAIN, "recipes/beir_no_split.yaml"], ["no split 'dev'", "['test', 'train']"]),
    ("texts_need_distill", [*TRAIN, "recipes/texts_without_distill.yaml"], ["label-free", "distill"]),
    ("texts_broken_json", [*TRAIN, "recipes/texts_badjson.yaml"], ["beir_badjson/corpus.jsonl:2", "not valid JSON"]),
    # eval grid: tasks and their data
    ("eval_task_misspelt_folder", [*EVAL, "--tasks", "./bier:test"], ["'bier'", "did you mean"]),
    ("eval_task_no_split", [*EVAL, "--tasks", "beir:dev"], ["no split 'dev'", "['test', 'train']"]),
    ("eval_task_misspelt_mteb", [*EVAL, "--tasks", "SciFactt"], ["'SciFactt'", "did you mean SciFact"]),
    ("eval_task_not_retrieval", [*EVAL, "--tasks", "MockClassificationTask"], ["only retrieval tasks"]),
    ("eval_corpus_broken_json", [*EVAL, "--tasks", "beir_badjson:test"], ["corpus.jsonl:2", "not valid JSON"]),
    ("eval_record_without_id", [*EVAL, "--tasks", "beir_noid:test"], ["corpus.jsonl:2", "no _id"]),
    ("eval_queries_not_utf8", [*EVAL, "--tasks", "beir_latin1:test"], ["queries.jsonl:1", "not UTF-8"]),
    ("eval_query_without_text", [*EVAL, "--tasks", "beir_notext:test"], ["queries.jsonl:1", "no text"]),
    ("eval_qrels_score_text", [*EVAL, "--tasks", "beir_score:test"], ["test.tsv:2", "'high'"]),
    ("eval_qrels_short_row", [*EVAL, "--tasks", "beir_short:test"], ["test.tsv:3"]),
    ("eval_qrels_no_header", [*EVAL, "--tasks", "beir_noheader:test"], ["test.tsv:1", "header"]),
    ("eval_corpus_empty", [*EVAL, "--tasks", "beir_empty:test"], ["corpus.jsonl is empty"]),
    # eval grid: cells, numbers, output
    ("eval_cell_too_deep", [*EVAL, *TASK, "--cells", "L9-D16"], ["9 layers", "the model has 4"]),
    ("eval_cell_too_wide", [*EVAL, *TASK, "--cells", "L2-D64-B1,L1-D8"], ["64 dims", "embeds in 32"]),
    ("eval_cell_malformed", [*EVAL, *TASK, "--cells", "L2D16"], ["'L2D16' is not a cell"]),
    ("eval_cell_bits_twice", [*EVAL, *TASK, "--cells", "L2-D16-B1", "--bits", "1"], ["name their bits"]),
    ("eval_bits_out_of_range", [*EVAL, *TASK, "--bits", "40"], ["bits must be 1..16"]),
    ("eval_bits_text", [*EVAL, *TASK, "--bits", "one"], ["--bits", "'one'"]),
    ("eval_layers_zero", [*EVAL, *TASK, "--layers", "0", "--dims", "8"], ["layers must be >= 1"]),
    ("eval_cells_and_layers", [*EVAL, *TASK, "--cells", "L1-D8", "--layers", "1", "--dims", "8"], ["not both"]),
    ("eval_batch_zero", [*EVAL, *TASK, "--batch-size", "0"], ["batch_size", "0", ">= 1"]),
    ("eval_batch_negative", [*EVAL, *TASK, "--batch-size", "-3"], ["batch_size", "-3"]),
    ("eval_seq_len_zero", [*EVAL, *TASK, "--max-seq-length", "0"], ["max_seq_length", ">= 1"]),
    ("eval_rescore_negative", [*EVAL, *TASK, "--rescore", "-1"], ["rescore", ">= 0"]),
    ("eval_codes_bad", [*EVAL, *TASK, "--codes", "maybe"], ["--codes", "'maybe'"]),
    ("eval_unknown_flag", [*EVAL, *TASK, "--bit", "1"], ["--bit"]),
    ("eval_output_is_file", ["eval", "grid", "--model", "tiny", *TASK, "--output", "afile.txt"], ["afile.txt", "file"]),
    ("eval_output_not_writable", ["eval", "grid", "--model", "tiny", *TASK, "--output", "/proc/x"], ["/proc"]),
    # eval grid: the model and the config file
    ("eval_model_missing", ["eval", "grid", "--model", "./nope", *TASK], ["'nope'", "does not exist"]),
    ("eval_model_is_file", ["eval", "grid", "--model", "afile.txt", *TASK], ["afile.txt", "is a file"]),
    ("eval_model_not_model", ["eval", "grid", "--model", "not_model", *TASK], ["not_model", "not a sentence-trans"]),
    ("eval_model_truncated", ["eval", "grid", "--model", "ckpt_truncated", *TASK], ["model.safetensors", "truncated"]),
    ("eval_model_bad_config", ["eval", "grid", "--model", "ckpt_badconfig", *TASK], ["config.json", "not valid JSON"]),
    ("eval_no_model", ["eval", "grid", *TASK], ["model: missing"]),
    ("eval_no_tasks", ["eval", "grid", "--model", "tiny"], ["tasks: missing"]),
    ("eval_config_missing", [*EVAL, *TASK, "--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
    ("eval_config_not_yaml", [*EVAL, *TASK, "--config", "eval_not_yaml.yaml"], ["eval_not_yaml.yaml", "line 2"]),
    ("eval_config_unknown_key", [*EVAL, *TASK, "--config", "eval_unknown_key.yaml"], ["batchsize", "batch_size"]),
    ("eval_config_typed", [*EVAL, *TASK, "--config", "eval_batch_text.yaml"], ["batch_size", "'eight'"]),
    # trainer export
    ("export_cell_too_deep", [*EXPORT, "--cell", "L9-D8"], ["--cell", "9 layers", "1..4"]),
    ("export_cell_malformed", [*EXPORT, "--cell", "L2-D8-X"], ["--cell", "'L2-D8-X' is not a cell"]),
    ("export_cell_bits", [*EXPORT, "--cell", "L2-D8-B99"], ["bits must be 1..16"]),
    ("export_no_cell", ["trainer", "export", "ckpt", "--out", "exported"], ["--cell"]),
    ("export_out_is_file", export(out="afile.txt"), ["is a file"]),
    ("export_out_not_empty", export(out="full"), ["not empty"]),
    ("export_out_not_writable", export(out="/proc/x"), ["/proc"]),
    # trainer wise-ft
    ("wise_ft_cli_alpha_zero", [*WISE_FT, "--alpha", "0", "--base", "tiny"], ["--alpha", "0.0", "(0, 1]"]),
    ("wise_ft_cli_alpha_text", [*WISE_FT, "--alpha", "half", "--base", "tiny"], ["--alpha", "'half'"]),
    ("wise_ft_cli_no_alpha", [*WISE_FT, "--base", "tiny"], ["--alpha"]),
    ("wise_ft_cli_out_not_empty", ["trainer", "wise-ft", "ckpt", "--alpha", "0.5", "--out", "full"], ["not empty"]),
    ("wise_ft_cli_base_unknown", [*WISE_FT, "--alpha", "0.5"], ["--base", "tiny-bert"]),
    ("wise_ft_cli_no_manifest", ["trainer", "wise-ft", "tiny", "--alpha", "0.5", "--out", "merged"], ["--base"]),
    ("wise_ft_cli_ckpt_missing", ["trainer", "wise-ft", "nope/", "--alpha", "0.5", "--out", "m"], ["'nope/'"]),
    (
        "export_ckpt_missing",
        export("nope/"),
        ["'nope/'", "cannot find"],
    ),
    ("export_ckpt_is_file", export("afile.txt"), ["is a file"]),
    ("export_ckpt_truncated", export("ckpt_truncated"), ["truncated"]),
    ("export_ckpt_not_model", export("not_model"), ["not_model"]),
    ("export_ckpt_hub_unknown", export("no-org/no-model"), ["no-org"]),
    # trainer publish (dry runs only: the Hub is never contacted)
    (
        "publish_repo_no_slash",
        ["trainer", "publish", "ckpt", "--repo-id", "noslash", "--dry-run", "dry"],
        ["namespace"],
    ),
    ("publish_repo_empty", ["trainer", "publish", "ckpt", "--repo-id", "", "--dry-run", "dry"], ["--repo-id", "''"]),
    ("publish_repo_space", ["trainer", "publish", "ckpt", "--repo-id", "a/b/c d", "--dry-run", "dry"], ["'a/b/c d'"]),
    ("publish_repo_dashes", ["trainer", "publish", "ckpt", "--repo-id", "org/a--b", "--dry-run", "dry"], ["--"]),
    ("publish_no_repo", ["trainer", "publish", "ckpt", "--dry-run", "dry"], ["--repo-id"]),
    ("publish_ckpt_missing", ["trainer", "publish", "nope", "--repo-id", "o/n", "--dry-run", "dry"], ["not exist"]),
    ("publish_ckpt_truncated", [*PUBLISH[:2], "ckpt_truncated", *PUBLISH[3:]], ["truncated"]),
    ("publish_ckpt_no_manifest", [*PUBLISH[:2], "tiny", *PUBLISH[3:]], ["elastic_manifest.json"]),
    ("publish_ckpt_bad_manifest", [*PUBLISH[:2], "ckpt_badmanifest", *PUBLISH[3:]], ["manifest", "not valid JSON"]),
    ("publish_cells_not_evaluated", [*PUBLISH, "--grid", "grid", "--cells", "L4-D32-B1"], ["were not evaluated"]),
    ("publish_cells_malformed", [*PUBLISH, "--grid", "grid", "--cells", "L4"], ["--cells", "'L4' is not a cell"]),
    ("publish_grid_missing", [*PUBLISH, "--grid", "grid_empty"], ["grid_empty", "no grid.json"]),
    ("publish_grid_bad_json", [*PUBLISH, "--grid", "grid_bad"], ["grid.json", "not valid JSON"]),
    ("publish_dry_run_is_file", [*PUBLISH[:-1], "afile.txt"], ["--dry-run", "is a file"]),
    ("publish_dry_run_not_empty", [*PUBLISH[:-1], "full"], ["--dry-run", "not empty"]),
    ("publish_dry_run_not_writable", [*PUBLISH[:-1], "/proc/x"], ["--dry-run", "/proc"]),
    # the command lines themselves
    ("trainer_no_command", ["trainer"], ["command"]),
    ("trainer_unknown_command", ["trainer", "frobnicate"], ["frobnicate"]),
    ("eval_unknown_command", ["eval", "score"], ["score"]),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_path) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    build_workspace(root, tiny_model_path)
    return root


@pytest.fixture(scope="module")
def forked() -> ForkedCli:
    return ForkedCli()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (size, modification time) and folder under ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
        for p in root.rglob("*")
    }


def check_one_error_line(code: int | None, stdout: str, stderr: str, expected: list[str]) -> None:
    """Exit code 2 and one line ``error: ...`` holding ``expected``; before it at most the progress bars of
    ``datasets`` reading a data file (the mistake was inside it), never a model's loading bars."""
    assert code is not None, f"still running after {TIMEOUT_S} s: it did not fail before loading a model"
    assert "Traceback" not in stderr, stderr
    assert code == 2, f"exit code {code}; stderr: {stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and stderr.endswith("\n"), stderr
    assert all(line.startswith("Generating train split") for line in lines[:-1]), stderr
    for text in expected:
        assert text in lines[-1], f"{text!r} is not in {lines[-1]!r}"
    assert stdout == ""


def test_the_table_covers_every_command_line_and_at_least_60_inputs():
    commands = {tuple(argv[:2]) for _, argv, _ in CASES}
    assert {("trainer", "train"), ("eval", "grid"), ("trainer", "export"), ("trainer", "publish")} <= commands
    assert ("trainer", "wise-ft") in commands
    assert len(CASES) >= 60 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("argv", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, forked, tmp_path, argv, expected):
    before = snapshot(workspace)
    code, stdout, stderr = forked.run(argv[0], argv[1:], workspace, tmp_path, TIMEOUT_S)
    check_one_error_line(code, stdout, stderr, expected)
    assert snapshot(workspace) == before


@pytest.mark.parametrize("name", ["lr_negative", "eval_qrels_score_text", "publish_repo_no_slash"])
def test_forked_runs_match_python_m(workspace, forked, tmp_path, name):
    argv = next(argv for case, argv, _ in CASES if case == name)
    forked_run = forked.run(argv[0], argv[1:], workspace, tmp_path, TIMEOUT_S)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's packages, whatever is installed
    real = subprocess.run(
        [sys.executable, "-m", *argv], cwd=workspace, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 60
    )
    assert (real.returncode, real.stdout, real.stderr) == forked_run


def test_good_recipe_and_typed_values_pass_the_same_checks(workspace, forked, tmp_path):
    """The bad cases fail for their mistake alone: the same command with good values validates and trains."""
    argv = ["train", "recipes/good.yaml", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none"]
    code, stdout, stderr = forked.run("trainer", [*argv, "--output_dir", "runs/0123"], workspace, tmp_path, 600)
    assert code == 0, stderr
    assert (workspace / "runs" / "0123" / "model.safetensors").is_file()
    shutil.rmtree(workspace / "runs")


def test_ctrl_c_during_evaluation_is_one_line_saying_how_to_resume_and_exit_130(tiny_model_path, tmp_path):
    beir = write_beir(tmp_path / "beir", docs=2000)
    stderr_path = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "eval", "grid", "--model", str(tiny_model_path), "--tasks", f"{beir}:test"]
    command += ["--output", str(tmp_path / "out"), "--batch-size", "1", "--layers", "1", "--dims", "8", "--bits", "32"]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal would start it
        )
        deadline = time.monotonic() + 300
        while "documents:" not in stderr_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=120)
    text = stderr_path.read_text()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 130 and "Traceback" not in text, text
    assert lines[-1] == (
        "interrupted: the texts encoded and the cells scored so far are kept in the output folder; rerun the same "
        "command to resume"
    )
