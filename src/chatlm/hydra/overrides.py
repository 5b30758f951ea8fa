"""A stage's command line checked against its schema before Hydra composes anything."""

from __future__ import annotations

import difflib

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
        for part in key.split("."):
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
            cls = nested_schema(cls, part)
            if cls is None:
                break  # a leaf or a container: the value's type is Hydra's job
