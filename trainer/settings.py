"""Typed settings: every value of a recipe, a config file or a ``--key value`` override gets its field's type.

Values are read the way ``transformers.HfArgumentParser`` reads the HF Trainer's command line: the type of
the dataclass field decides. ``--save_strategy no`` stays the string ``"no"``, ``--output_dir 0123`` stays
``"0123"``, ``--learning_rate 1e-4`` is a float and ``--bf16 yes`` is ``True``. YAML files are read with
``null`` as the only implicit type (``read_yaml``), so ``save_strategy: no`` in a file means what it means
on the command line. Only list and dict fields parse text as YAML flow (``[L2-D64, L6-D384]``,
``{anchor: q}``); a list field also takes ``a,b`` or a single value. A value that cannot take its field's
type is a ``UserError`` naming the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from trainer.errors import UserError

TRUE_WORDS = ("true", "yes", "y", "t", "on", "1")  # transformers' string_to_bool and str_to_bool
FALSE_WORDS = ("false", "no", "n", "f", "off", "0")
NULL_WORDS = ("null", "none", "~")
_NULL_TAG = "tag:yaml.org,2002:null"


class Plain(str):
    """Unquoted text from a YAML file or the command line: the field it fills decides its type."""


class _TextLoader(yaml.SafeLoader):
    """YAML with ``null`` as the only implicit type; every other unquoted scalar stays text (``Plain``)."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag == _NULL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_TextLoader.add_constructor(
    "tag:yaml.org,2002:str",
    lambda loader, node: (Plain if node.style is None else str)(loader.construct_scalar(node)),
)


def _yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def read_yaml(path: str | Path, key: str) -> Any:
    """The YAML file at ``path`` as text values (``Plain``), lists, dicts and None; ``key`` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{key}: {path} is not UTF-8 text (byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_TextLoader)
    except yaml.YAMLError as error:
        raise UserError(f"{key}: {path} is not valid YAML: {_yaml_error(error)}") from None


def _flow(text: str, key: str) -> Any:
    try:
        return yaml.load(text, Loader=_TextLoader)
    except yaml.YAMLError as error:
        raise UserError(f"{key}: {text!r} is not valid YAML flow ({_yaml_error(error)})") from None


def describe(hint: Any) -> str:
    """The type ``hint`` in words, for error messages."""
    nouns = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    origin, args = get_origin(hint), get_args(hint)
    if hint in nouns:
        return nouns[hint]
    if origin is Union or isinstance(hint, types.UnionType):
        words = [describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(member.value) for member in hint)
    if origin is list or hint is list:
        return f"a list like [a, b] of {describe(args[0])}" if args else "a list like [a, b]"
    if origin is dict or hint is dict:
        return "a mapping like {key: value}"
    if dataclasses.is_dataclass(hint):
        fields = ", ".join(f.name for f in dataclasses.fields(hint) if f.init)
        return f"a mapping of settings ({fields})"
    return getattr(hint, "__name__", str(hint))


def _invalid(key: str, value: Any, hint: Any) -> UserError:
    return UserError(f"{key}: {value!r} is not valid; expected {describe(hint)}")


def _untyped(value: Any) -> Any:
    """A value of a field typed ``Any``: unquoted text typed as YAML 1.2 would (true/false, null, numbers)."""
    if isinstance(value, list):
        return [_untyped(item) for item in value]
    if isinstance(value, dict):
        return {_untyped(k): _untyped(v) for k, v in value.items()}
    if not isinstance(value, Plain):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.lower() in NULL_WORDS:
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return str(value)


def typed_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` (Optional, Union, Literal, Enum, bool, int, float, str, list, dict or a
    dataclass, built from a mapping); text converts, values of the right type pass unchanged."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or hint is object:
        return _untyped(value)
    if origin is Union or isinstance(hint, types.UnionType):
        return _typed_union(value, hint, key)
    if value is None:
        raise _invalid(key, value, hint)
    text = value.strip() if isinstance(value, str) else None
    if origin is Literal:
        for choice in args:
            if value == choice or (text is not None and text == str(choice)):
                return choice
        raise _invalid(key, value, hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = {str(member.value): member.value for member in hint}
        if isinstance(value, hint) or text in values:
            return value if isinstance(value, hint) else values[text]
        raise _invalid(key, value, hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise _invalid(key, value, hint)
    if hint in (int, float):
        return _number(value, text, hint, key)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _invalid(key, value, hint)
    if origin is list or hint is list:
        return _typed_list(value, text, args[0] if args else Any, key)
    if origin is dict or hint is dict:
        if text is not None and text.startswith("{"):
            value = _flow(text, key)
        if not isinstance(value, dict):
            raise _invalid(key, value, hint)
        key_type, value_type = args or (Any, Any)
        return {typed_value(k, key_type, key): typed_value(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return build_dataclass(hint, value, key)
    if origin is Callable or hint is Callable:
        if callable(value) and text is None:
            return value
        raise _invalid(key, value, hint)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _invalid(key, value, hint)
    return value


def _number(value: Any, text: str | None, hint: type, key: str) -> int | float:
    if isinstance(value, bool):
        raise _invalid(key, value, hint)
    number = value
    if text is not None:
        try:
            number = int(text) if hint is int else float(text)
        except ValueError:
            try:
                number = float(text)  # an integer written as 1e3
            except ValueError:
                raise _invalid(key, value, hint) from None
    if not isinstance(number, (int, float)):
        raise _invalid(key, value, hint)
    if hint is float:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise _invalid(key, value, hint)
    return int(number)


def _typed_list(value: Any, text: str | None, item_type: Any, key: str) -> list:
    if text is not None:
        if text.startswith(("[", "{")):
            value = _flow(text, key)
        else:
            value = [Plain(part.strip()) for part in text.split(",") if part.strip()]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise _invalid(key, value, list[item_type] if item_type is not Any else list)
    return [typed_value(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]


def _typed_union(value: Any, hint: Any, key: str) -> Any:
    """Optional[X] is None or X; a union with an Enum is that Enum (as HfArgumentParser reads it); otherwise
    the first member the value fits (text fits a list only as ``[...]``, a dict only as ``{...}``, a bool
    only as true/false), then str."""
    members = [arg for arg in get_args(hint) if arg is not type(None)]
    optional = len(members) < len(get_args(hint))
    is_null = value is None or (isinstance(value, Plain) and str not in members and value.strip().lower() in NULL_WORDS)
    if is_null:
        if optional:
            return None
        raise _invalid(key, value, hint)
    if len(members) == 1:
        return typed_value(value, members[0], key)
    enums = [arg for arg in members if isinstance(arg, type) and issubclass(arg, enum.Enum)]
    if enums and isinstance(value, str):
        return typed_value(value, enums[0], key)
    for member in members:
        if member is str or (isinstance(value, str) and not _looks_like(value.strip(), member)):
            continue
        if isinstance(value, str) and (get_origin(member) or member) in (list, dict):
            return typed_value(value, member, key)  # text written as [...] or {...} is meant as one
        try:
            return typed_value(value, member, key)
        except UserError:
            continue
    if str in members and isinstance(value, str):
        return str(value)
    raise _invalid(key, value, hint)


def _looks_like(text: str, member: Any) -> bool:
    origin = get_origin(member) or member
    if origin is list:
        return text.startswith("[")
    if origin is dict:
        return text.startswith("{")
    if member is bool:
        return text.lower() in ("true", "false")
    return True


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every ``__init__`` field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def did_you_mean(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def build_dataclass(cls: type, values: Any, key: str):
    """Dataclass ``cls`` from a mapping, each value typed (``typed_value``); names unknown and missing keys."""
    if values is None:
        values = {}
    if dataclasses.is_dataclass(values) and isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise UserError(f"{key}: expected a mapping of settings, got {values!r}")
    types_ = field_types(cls)
    valid = list(types_)
    typed = {}
    for name, value in values.items():
        if name not in types_:
            hint = did_you_mean(str(name), valid)
            raise UserError(f"{key}.{name}: unknown key{hint}; valid keys: {', '.join(valid)}")
        typed[name] = typed_value(value, types_[name], f"{key}.{name}")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in typed and _required(f)]
    if missing:
        raise UserError(f"{key}: missing {', '.join(missing)}; valid keys: {', '.join(valid)}")
    return cls(**typed)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
