"""Type checks for config values, driven by the resolved annotations of the dataclasses they fill.

`field_types(cls)` resolves a dataclass's annotations with `typing.get_type_hints` (phitune's sections use
`from __future__ import annotations`, TRL's and PEFT's configs mix `X | None`, `Optional`, `Union`, `Literal` and
enums), the way transformers' HfArgumentParser resolves them before it builds a parser. `check_value` then tests a
YAML value against the real type, never against the annotation's text, so a library that rewrites `int | None` as
`Optional[int]` changes nothing here. An annotation this module does not understand is let through at run time
(a config should not fail because a library grew a new kind of field), but `understood` reports it, and
tests/test_config.py walks every field of every config class phitune validates and fails on any it does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

# Annotations that mean "any value": nothing to check. Keep this short; every entry needs a reason.
FREE_FORM = (
    Any,  # the values of dict[str, Any] fields (model_init_kwargs, ...) are passed through to the library as-is
)

_NONE = type(None)
_SCALARS = (bool, int, float, str)


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    """Each field's resolved type; a field whose default is None also accepts None (`x: str = None`). Should a
    library's annotations stop resolving, its fields go unchecked here and the field-walking test fails."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a NameError in a library's annotations must not block a training run
        hints = {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}
    out = {}
    for f in dataclasses.fields(cls):
        type_ = hints.get(f.name, Any)
        if f.default is None and not _accepts(None, type_):
            type_ = Union[type_, None]
        out[f.name] = type_
    return out


def _is_union(type_) -> bool:
    return get_origin(type_) in (Union, types.UnionType)


def _is_enum(type_) -> bool:
    return isinstance(type_, type) and issubclass(type_, enum.Enum)


def _is_dataclass(type_) -> bool:
    return isinstance(type_, type) and dataclasses.is_dataclass(type_)


def understood(type_) -> bool:
    """Whether `check_value` can check a value against this type (rather than letting anything through)."""
    if type_ in FREE_FORM or type_ is _NONE or type_ is None or type_ in (*_SCALARS, dict, list, tuple):
        return True
    if _is_enum(type_) or _is_dataclass(type_):
        return True
    origin, args = get_origin(type_), get_args(type_)
    if origin is Literal:
        return all(isinstance(a, (*_SCALARS, _NONE)) for a in args)
    if _is_union(type_) or origin in (list, tuple, dict):
        return all(a is Ellipsis or understood(a) for a in args)
    return False


def _same(value, choice) -> bool:
    """`value == choice` without True == 1 or 0 == False."""
    return type(value) is type(choice) and value == choice


def _accepts(value, type_) -> bool:
    if type_ in FREE_FORM:
        return True
    if type_ is _NONE or type_ is None:
        return value is None
    if type_ is bool or type_ is str or type_ is dict or type_ is list:
        return isinstance(value, type_)
    if type_ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ is float:  # an int is a number too; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_ is tuple:
        return isinstance(value, (list, tuple))  # YAML has no tuples: a sequence is one
    if _is_enum(type_):
        return isinstance(value, type_) or any(_same(value, m.value) for m in type_)
    if _is_dataclass(type_):
        return isinstance(value, (type_, dict))  # YAML writes the nested config as a mapping
    origin, args = get_origin(type_), get_args(type_)
    if origin is Literal:
        return any(_same(value, a) for a in args)
    if _is_union(type_):
        if isinstance(value, str) and _string_names_enum(type_):
            return any(_accepts(value, a) for a in args if a is not str)
        return any(_accepts(value, a) for a in args)
    if origin is list:  # a lone item is a one-item list, as HfArgumentParser (nargs="+") and TRL (loss_type) read it
        if not args:
            return isinstance(value, list)
        return all(_accepts(v, args[0]) for v in value) if isinstance(value, list) else _accepts(value, args[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(v, args[0]) for v in value)
        return not args or len(value) == len(args) and all(_accepts(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_accepts(k, args[0]) and _accepts(v, args[1]) for k, v in value.items())
    return True  # not understood: see `understood` and the test that walks every field


def _string_names_enum(type_) -> bool:
    """`SchedulerType | str`, `OptimizerNames | str`, `TaskType | str`: the `str` is for callers' typing only, since
    TrainingArguments and PEFT turn the string into the enum when the config is built and reject any other string.
    So a string must be one of the enum's values here too, and a typo fails when the YAML is read (with every other
    problem and a suggestion), not when the trainer's config is built after the data has been prepared, which takes
    minutes on a large dataset. tests/test_config.py checks the libraries still reject such a string themselves."""
    members = _members(type_)
    return str in members and any(_is_enum(m) for m in members)


def _members(type_) -> tuple:
    return get_args(type_) if _is_union(type_) else (type_,)


def _choices(type_) -> list:
    """The string values a type names: its Literal members and enum values."""
    out = []
    for member in _members(type_):
        if get_origin(member) is Literal:
            out += [a for a in get_args(member) if isinstance(a, str)]
        elif _is_enum(member):
            out += [m.value for m in member if isinstance(m.value, str)]
    return out


def describe(type_) -> str:
    """Words for a type in an error message: `int`, `a number`, `one of a, b`, `str or a list of str`."""
    if type_ in FREE_FORM:
        return "any value"
    if type_ is float:
        return "a number"
    if type_ is dict or get_origin(type_) is dict:
        return "a mapping"
    if type_ is list or type_ is tuple or get_origin(type_) in (list, tuple):
        args = [a for a in get_args(type_) if a is not Ellipsis]
        return f"a list of {describe(args[0])}" if len(set(args)) == 1 else "a list"
    if get_origin(type_) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(type_))
    if _is_enum(type_):
        return "one of " + ", ".join(str(m.value) for m in type_)
    if _is_dataclass(type_):
        return f"a mapping of {type_.__name__} keys"
    if _is_union(type_):
        members = [a for a in get_args(type_) if a is not _NONE]
        if _string_names_enum(type_):  # the enum's values are the strings that pass
            members = [a for a in members if a is not str]
        elif str in members:  # any string passes, so naming a Literal's values would mislead
            members = [a for a in members if get_origin(a) is not Literal]
        return " or ".join(dict.fromkeys(describe(a) for a in members)) or "null"
    return getattr(type_, "__name__", str(type_))


def yaml_value(value, type_):
    """YAML 1.1 reads `no`/`off`/`false` as False and `yes`/`on`/`true` as True. Where the type takes no bool but
    names one of those words as a choice (`save_strategy: no`, `speed.liger: false`), read the word back."""
    if isinstance(value, bool) and not _accepts(value, type_):
        choices = _choices(type_)
        for word in ("true", "yes", "on") if value else ("false", "no", "off"):
            if word in choices:
                return word
    return value


def did_you_mean(word, choices, case_blind: bool = False) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a misspelt key or value, or "" when none is close;
    `case_blind` also matches `SimPO` to `simpo`."""
    choices = [str(c) for c in choices]
    if not case_blind:
        close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
        return f" (did you mean {close[0]!r}?)" if close else ""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def check_value(where: str, key: str, value, type_) -> str | None:
    """The problem with `where.key: value` for a field of type `type_`, or None when the value fits."""
    if _accepts(value, type_):
        return None
    choices = _choices(type_)
    hint = did_you_mean(value, choices, case_blind=True) if isinstance(value, str) and choices else ""
    return f"{where}.{key} must be {describe(type_)}, got {value!r}{hint}"
