"""A stage's command line checked against its schema before Hydra composes anything."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from typing import Any, Optional

from chatlm.config import STAGE_SCHEMAS, schema_fields
from chatlm.config.keys import nested_schema
from chatlm.config.tree import config_groups
from chatlm.errors import UsageError


def check_overrides(stage: str, args: list[str]) -> None:
    """Reject an override of a key that no schema has, suggesting the closest real key.

    Hydra would also refuse it, but its message does not say what was meant. Group choices
    (`model=d25x`) are left to Hydra, whose message lists the valid options.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    schema = STAGE_SCHEMAS.get(stage)
    candidates = [a for a in args if a and not a.startswith("-") and "=" in a]
    if schema is None or not candidates:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:
        return  # syntax errors: Hydra reports them with position information
    groups = set(config_groups())
    for ov in overrides:
        key = ov.key_or_group
        if ov.is_delete() or key.startswith("hydra") or key in groups or ov.package:
            continue
        cls, walked = schema, []
        parts = key.split(".")
        i = 0
        while i < len(parts):
            part = parts[i]
            if part not in schema_fields(cls):
                known = schema_fields(cls)
                where = ".".join(walked) or "the top level"
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" Did you mean '{'.'.join(walked + close)}'?" if close else ""
                raise UsageError(
                    f"unknown config key '{key}': '{part}' is not a key of {where}.{hint}\n"
                    f"  valid keys of {where}: {', '.join(known)}"
                )
            walked.append(part)
            sub = nested_schema(cls, part) or _dict_value_schema(cls, part)
            if sub is not None and nested_schema(cls, part) is None and i + 1 < len(parts):
                walked.append(parts[i + 1])  # a Dict[str, schema] field: skip the entry's name
                i += 1
            elif sub is None:
                if i == len(parts) - 1 and not ov.is_sweep_override():
                    _check_value(key, _field_type(cls, part), ov.value())
                break  # a leaf or a container
            cls = sub
            i += 1


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls).get(name)


def _dict_value_schema(cls: type, name: str) -> Optional[type]:
    """X of a `Dict[str, X]` field whose X is a schema dataclass (e.g. mixture.sources)."""
    t = _field_type(cls, name)
    if typing.get_origin(t) in (dict, typing.Dict):
        args = typing.get_args(t)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return args[1]
    return None


def _check_value(key: str, want: Any, value: Any) -> None:
    """A one-line UsageError when an override's value cannot be the field's type (Hydra would
    refuse it too, with a multi-line message); interpolations and containers are Hydra's job."""
    if want is None or value is None or (isinstance(value, str) and "${" in value):
        return
    args = typing.get_args(want)
    if typing.get_origin(want) is typing.Union and type(None) in args:
        want = next(a for a in args if a is not type(None))
    if isinstance(want, type) and issubclass(want, enum.Enum):
        valid = [m.value for m in want]
        if value not in valid and str(value) not in valid:
            raise UsageError(f"{key}: invalid value {value!r}; valid: {', '.join(map(str, valid))}")
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }.get(want)
    if ok is not None and not ok(value):
        raise UsageError(f"{key}: must be {want.__name__}, got {value!r}")
