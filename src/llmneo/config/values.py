"""A config value as written in YAML or on the command line, turned into its field's type.

`coerce` knows types, not keys: given a field's type hint (`int`, `float | None`, ...) it parses text,
numbers and booleans strictly, and reports a value it cannot take as one line that names the key and
shows a valid example. `config.coerce` applies it with the Config field's own hint.
"""

from __future__ import annotations

import math
import typing
from typing import Any

from llmneo.errors import LlmneoError

_EXAMPLES = {bool: "true", int: "8", float: "2e-4", str: "text"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def base_type(hint: Any) -> type:
    """`int` for `int` and for `int | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def optional(hint: Any) -> bool:
    """Whether the hint allows None (`... | None`): the key may be set to null."""
    return type(None) in typing.get_args(hint)


def coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` as the type `hint` asks for, or a one-line LlmneoError about key `name`."""
    kind = base_type(hint)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional(hint):
            return None
        raise LlmneoError(f"config key '{name}' cannot be empty; give a {kind.__name__} value")
    try:
        return _PARSERS[kind](value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise LlmneoError(
        f"config key '{name}' expects {kind.__name__}, got {value!r}; e.g. {name}={_EXAMPLES.get(kind, 'value')}")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool):  # YAML's true is an int to Python, never a count
        raise ValueError(value)
    number = float(value) if isinstance(value, (str, float)) else value
    if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
        raise ValueError(value)  # 2.5 steps, or an infinite count
    return int(number)


def _real(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # a YAML list of modules or datasets: the comma form
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        raise ValueError(value)
    return str(value)


_PARSERS = {bool: _boolean, int: _integer, float: _real, str: _text}
