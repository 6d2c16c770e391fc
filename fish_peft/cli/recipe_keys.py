"""Recipe keys as dataclass fields: each with its meaning, default and allowed values in the field's metadata, read
by `--help` (`describe_keys`), by the checks of allowed values, and by the conversion of `--key value` strings to the
key's type. Standard library only."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
import typing
from typing import Any, Optional


def key(default: Any, help: str, choices: Optional[tuple] = None, shown_type: Optional[str] = None) -> Any:
    """A recipe key: its default, what it means and, when limited, its allowed values (items or keys for a list or
    a dict); `shown_type` replaces the type `--help` would derive from the annotation. `--help` and `check_choices`
    read them from the field's metadata."""
    metadata = {"help": help, **({"choices": choices} if choices else {}), **({"type": shown_type} if shown_type else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(recipe: Any, error: type[Exception] = ValueError) -> None:
    """Refuse a value outside its key's allowed values (each item of a list key, each key of a dict key)."""
    for f in dataclasses.fields(recipe):
        value, choices = getattr(recipe, f.name), f.metadata.get("choices")
        if choices and any(v not in choices for v in (value if isinstance(value, (list, dict)) else [value])):
            allowed = ", ".join(show(c) for c in choices)
            raise error(f"{type(recipe).__name__}: {f.name} must be one of {allowed}, got {value!r}.")


def check_at_least(recipe: Any, minimum: float, *names: str, error: type[Exception] = ValueError) -> None:
    """Refuse a key below `minimum` (keys left at None are fine)."""
    for name in names:
        value = getattr(recipe, name)
        if value is not None and value < minimum:
            raise error(f"{type(recipe).__name__}: {name} must be at least {minimum}, got {value}.")


def convert_value(name: str, raw: str, annotation: Any) -> Any:
    """'1e-3' -> 1e-3 for a float key, 'a,b' -> ['a', 'b'] for a list key, 'none' -> None for an optional one."""
    optional, target = unwrap(annotation)
    if optional and raw.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(target)
    try:
        if origin is list:
            return _items(raw, ",", typing.get_args(target)[0])
        if origin is dict:
            value_type = typing.get_args(target)[1]
            if typing.get_origin(value_type) is list:  # method=1e-3:2e-3,...
                item_type = typing.get_args(value_type)[0]
                read = lambda value: _items(value, ":", item_type)  # noqa: E731
            else:
                read = _literal if value_type is Any else value_type
            return {k.strip(): read(v.strip()) for k, v in (pair.split("=") for pair in raw.split(",") if pair)}
        if target is bool:
            return raw.lower() in ("1", "true", "yes")
        if target in (int, float):
            return target(raw)
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')}: cannot read {raw!r} as {type_name(target)}.") from None
    return raw


def _items(raw: str, separator: str, item_type: type) -> list:
    """'0,1,2' -> [0, 1, 2] for a list of ints (strings stay strings)."""
    items = [item.strip() for item in raw.split(separator) if item.strip()]
    return [item_type(item) for item in items] if item_type in (int, float) else items


def _literal(raw: str) -> Any:
    """A value of a free-form mapping key as YAML would read it: true/false, an int, a float, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def unwrap(annotation: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None) of a key's annotation."""
    args = typing.get_args(annotation)
    if type(None) in args:
        return True, next(a for a in args if a is not type(None))
    return False, annotation


def type_name(annotation: Any) -> str:
    optional, target = unwrap(annotation)
    origin, args = typing.get_origin(target), typing.get_args(target)
    if origin is list:
        name = f"comma-separated {args[0].__name__}s"
    elif origin is dict and typing.get_origin(args[1]) is list:
        item = typing.get_args(args[1])[0].__name__
        name = f"method={item}:{item}:...,..."
    elif origin is dict:
        name = "key=value,..." if args[1] is Any else f"method={args[1].__name__},..."
    else:
        name = getattr(target, "__name__", str(target))
    return f"{name} or none" if optional else name


def show(value: Any) -> str:
    """A value as one types it on the command line: none, a,b or fish=2e-3."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(empty)"
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    return str(value)


def describe_keys(recipe_cls: type, width: int = 100) -> str:
    """--help's list of `recipe_cls`'s keys: for each, its type, what it means, its default and its allowed values."""
    hints = typing.get_type_hints(recipe_cls)
    lines = []
    for f in dataclasses.fields(recipe_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = f"({f.metadata.get('type') or type_name(hints[f.name])}) {f.metadata['help']}. Default: {show(default)}."
        if f.metadata.get("choices"):
            text += f" Allowed: {' | '.join(show(c) for c in f.metadata['choices'])}."
        lines.append(textwrap.fill(
            text, width, initial_indent=f"  {f.name:<21} ", subsequent_indent=" " * 24, break_on_hyphens=False,
            break_long_words=False))
    return "\n".join(lines)
