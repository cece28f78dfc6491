"""Typed values (issue 18): command-line overrides and recipe values get their field's type as HfArgumentParser
gives it; YAML literals like ``no``, ``none``, ``1e10`` or ``0123`` stay text wherever a string is valid."""

from __future__ import annotations

import enum
import types
import typing

import pytest
import yaml

from tests.conftest import REPO, requires_shared_data
from trainer.errors import UserError
from trainer.settings import Plain, read_yaml, typed_value
from trainer.train.recipe import (
    SourceConfig,
    apply_overrides,
    load_recipe,
    training_arguments,
    training_types,
    training_value,
)

YAML_LITERALS = ["no", "none", "yes", "off", "on", "y", "n", "No", "NULL", "1e10", "0123", "12", "0x1F", "1_000"]


def admits_text(hint) -> bool:
    return hint is str or (
        isinstance(hint, types.UnionType | typing._UnionGenericAlias) and str in typing.get_args(hint)
    )


def text_list(hint) -> bool:
    """list[str], alone or Optional."""
    return list[str] in (hint, *typing.get_args(hint))


def enum_of(hint) -> type[enum.Enum] | None:
    members = typing.get_args(hint) or (hint,)
    return next((m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)), None)


STRING_ARGUMENTS = sorted(
    name for name, hint in training_types().items() if admits_text(hint) or enum_of(hint) or text_list(hint)
)


def test_the_table_holds_every_string_valued_training_argument():
    for name in ("save_strategy", "eval_strategy", "report_to", "hub_strategy", "lr_scheduler_type", "output_dir"):
        assert name in STRING_ARGUMENTS
    assert len(STRING_ARGUMENTS) >= 30


@pytest.mark.parametrize("name", STRING_ARGUMENTS)
@pytest.mark.parametrize("text", YAML_LITERALS)
def test_yaml_literals_stay_text_in_string_valued_training_arguments(name, text):
    """A string field keeps the text exactly; an enum field keeps it if it is one of the enum's values and
    otherwise names the key, the value and the valid values."""
    hint = training_types()[name]
    choices = enum_of(hint)
    if choices is not None and text not in {str(member.value) for member in choices}:
        with pytest.raises(UserError, match=rf"^--{name}: '{text}' is not valid; expected one of "):
            training_value(name, Plain(text), f"--{name}")
        return
    value = training_value(name, Plain(text), f"--{name}")
    if hint == str | bool and text.lower() in ("true", "false"):
        assert value is (text.lower() == "true")
    elif type(None) in typing.get_args(hint) and not admits_text(hint) and text.lower() in ("none", "null"):
        assert value is None  # an optional list: null
    elif not admits_text(hint):
        assert value == [text] and type(value[0]) is str
    else:
        assert value == text and type(value) is str


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        (["--save_strategy", "no"], "save_strategy", "no"),
        (["--eval_strategy", "no"], "eval_strategy", "no"),
        (["--report_to", "none"], "report_to", "none"),
        (["--report_to", "[tensorboard, wandb]"], "report_to", ["tensorboard", "wandb"]),
        (["--report_to", "tensorboard", "wandb"], "report_to", ["tensorboard", "wandb"]),
        (["--hub_strategy", "end"], "hub_strategy", "end"),
        (["--lr_scheduler_type", "cosine"], "lr_scheduler_type", "cosine"),
        (["--output_dir", "0123"], "output_dir", "0123"),
        (["--run_name", "1e10"], "run_name", "1e10"),
        (["--learning_rate", "1e-4"], "learning_rate", 1e-4),
        (["--learning-rate=3"], "learning_rate", 3.0),
        (["--max_steps", "1e3"], "max_steps", 1000),
        (["--warmup_steps", "0.1"], "warmup_steps", 0.1),
        (["--bf16", "no"], "bf16", False),
        (["--push_to_hub", "yes"], "push_to_hub", True),
        (["--eval_steps", "none"], "eval_steps", None),
        (["--save_total_limit", "null"], "save_total_limit", None),
        (
            ["--lr_scheduler_kwargs", "{num_cycles: 2, power: 0.5}"],
            "lr_scheduler_kwargs",
            {"num_cycles": 2, "power": 0.5},
        ),
        (["--learning_rate_mapping", '{"heads": 1e-3}'], "learning_rate_mapping", {"heads": 1e-3}),
        (["--label_names", "labels,scores"], "label_names", ["labels", "scores"]),
        (["--include_num_input_tokens_seen", "no"], "include_num_input_tokens_seen", "no"),
        (["--include_num_input_tokens_seen", "true"], "include_num_input_tokens_seen", True),
    ],
)
def test_training_overrides_take_the_argument_type(override, key, expected):
    assert apply_overrides({}, override)["training"][key] == expected


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        (["--model.revision", "1e10"], "model", "revision", "1e10"),
        (["--model.revision", "0123"], "model", "revision", "0123"),
        (["--model.max_seq_length", "128"], "model", "max_seq_length", 128),
        (["--model.trust_remote_code", "on"], "model", "trust_remote_code", True),
        (["--loss.cells", "L1-D8,L2-D16"], "loss", "cells", ["L1-D8", "L2-D16"]),
        (["--loss.cells", "L2-D64"], "loss", "cells", ["L2-D64"]),
        (["--loss.cells", "[L1-D8, L2-D16]"], "loss", "cells", ["L1-D8", "L2-D16"]),
        (["--loss.cells", "L1-D8", "L2-D16"], "loss", "cells", ["L1-D8", "L2-D16"]),
        (["--loss.type", "grid"], "loss", "type", "grid"),
        (["--loss.scale", "20"], "loss", "scale", 20.0),
        (["--binary.bits", "1,2,4"], "binary", "bits", [1, 2, 4]),
        (["--binary.sharing", "cell"], "binary", "sharing", "cell"),
        (["--distill.teacher", "self"], "distill", "teacher", "self"),
        (["--distill.max_seq_length", "null"], "distill", "max_seq_length", None),
        (["--data.train", "[{beir: x, min_score: 2}]"], "data", "train", [SourceConfig(beir="x", min_score=2.0)]),
    ],
)
def test_recipe_overrides_take_the_config_field_type(override, section, key, expected):
    assert apply_overrides({}, override)[section][key] == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--learning_rate", "abc"], r"^--learning_rate: 'abc' is not valid; expected a number$"),
        (["--max_steps", "2.5"], r"^--max_steps: '2.5' is not valid; expected an integer$"),
        (["--bf16", "maybe"], r"^--bf16: 'maybe' is not valid; expected true or false$"),
        (["--save_strategy", "never"], r"^--save_strategy: 'never' is not valid; expected one of no, steps, epoch"),
        (["--learning_rate", "-1"], r"^--learning_rate: -1.0 is not valid; give a number > 0$"),
        (["--per_device_train_batch_size", "0"], r"^--per_device_train_batch_size: 0 is not valid; give an integer"),
        (["--save_total_limit", "0"], r"^--save_total_limit: 0 is not valid; give an integer >= 1"),
        (
            ["--model.max_seq_length", "abc"],
            r"^--model.max_seq_length: 'abc' is not valid; expected an integer$",
        ),
        (["--binary.bits", "1,x"], r"^--binary.bits\[1\]: 'x' is not valid; expected an integer$"),
        (["--lr_scheduler_kwargs", "{a: [}"], r"^--lr_scheduler_kwargs: '\{a: \[\}' is not valid YAML flow"),
        (["--loss.type", "grdi"], r"^--loss.type: 'grdi' is not valid; expected one of starbucks, 2dmse, grid$"),
        (["--model.nmae", "x"], r"^--model.nmae: unknown key \(did you mean 'name'\?\)"),
        (["--data.train", "{beir: x}"], r"^--data.train: \{'beir': 'x'\} is not valid; expected a list"),
    ],
)
def test_a_value_that_cannot_take_the_type_names_key_value_and_type(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides({}, override)


def test_the_demo_overrides_build_training_arguments():
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    training = apply_overrides(
        {"training": {"output_dir": "runs/x"}},
        ["--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--hub_strategy", "end"],
    )["training"]
    args = training_arguments(training)
    assert args.save_strategy == SaveStrategy.NO and args.eval_strategy == IntervalStrategy.NO
    assert args.report_to == [] and args.hub_strategy == "end"


def test_the_demo_recipe_takes_the_no_and_none_overrides(caplog):
    """configs/demo.yaml (with its evaluation section) accepts them; with no evaluation strategy its per-cell
    evaluation does not run, as the Trainer does, and a warning says so."""
    requires_shared_data("cranfield")
    overrides = ["--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none"]
    recipe = load_recipe(str(REPO / "configs" / "demo.yaml"), overrides)
    assert (recipe.training["save_strategy"], recipe.training["eval_strategy"]) == ("no", "no")
    assert recipe.training["report_to"] == "none"
    assert "the per-cell evaluation will not run" in caplog.text


def test_recipe_files_are_typed_like_the_command_line(tmp_path, tiny_model_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{name: {tiny_model_path}, revision: null}}\n"
        "data: {train: [{path: pairs.jsonl, min_score: 4}]}\n"
        "loss:\n  cells: L1-D8, L2-D16\n"
        f"training: {{output_dir: {tmp_path}/0123, save_strategy: no, report_to: none, learning_rate: 1e-4,"
        " bf16: off, seed: 7, run_name: '1e10'}\n"
    )
    recipe = load_recipe(path)
    assert recipe.training == {
        "output_dir": f"{tmp_path}/0123",
        "save_strategy": "no",
        "report_to": "none",
        "learning_rate": 1e-4,
        "bf16": False,
        "seed": 7,
        "run_name": "1e10",
    }
    assert recipe.model.revision is None and recipe.loss.cells == ["L1-D8", "L2-D16"]
    assert recipe.data.train[0].min_score == 4.0


def test_a_wrongly_typed_recipe_value_names_its_key(tmp_path, tiny_model_path):
    path = tmp_path / "recipe.yaml"
    raw = {
        "model": {"name": str(tiny_model_path)},
        "data": {"train": [{"path": "pairs.jsonl"}]},
        "training": {"output_dir": str(tmp_path / "run"), "learning_rate": "abc"},
    }
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"^training.learning_rate: 'abc' is not valid; expected a number$"):
        load_recipe(path)


def test_read_yaml_keeps_quoted_text_and_names_the_line_of_a_syntax_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: no\nb: '12'\nc: 12\nd: ~\ne: [1, on]\n")
    assert read_yaml(path, "x") == {"a": "no", "b": "12", "c": "12", "d": None, "e": ["1", "on"]}
    assert type(read_yaml(path, "x")["b"]) is str and type(read_yaml(path, "x")["c"]) is Plain
    assert typed_value(read_yaml(path, "x"), typing.Any, "x") == {
        "a": "no",
        "b": "12",
        "c": 12,
        "d": None,
        "e": [1, "on"],
    }
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(UserError, match=r"^x: .*x.yaml is not valid YAML: line 3"):
        read_yaml(path, "x")
