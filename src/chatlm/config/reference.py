"""The configuration reference in docs/configs.md, generated from the schemas' field descriptions.

    python -m chatlm.config.reference            # print the reference
    python -m chatlm.config.reference --write    # rewrite its part of docs/configs.md

The part of docs/configs.md between the two markers below is this output; tests/test_configs.py
fails when the two differ.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from pathlib import Path

from chatlm.config.data import DataConfig, DataSourceConfig
from chatlm.config.fields import affects_results, field_help
from chatlm.config.keys import nested_schema
from chatlm.config.registry import GROUP_SCHEMAS, STAGE_SCHEMAS

BEGIN = "<!-- begin generated: python -m chatlm.config.reference --write -->"
END = "<!-- end generated -->"
DOC = Path(__file__).resolve().parents[3] / "docs" / "configs.md"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(group)"
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            return "(list)"
    else:
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(schema: type, skip_groups: bool = False) -> list[str]:
    rows = ["| key | default | description |", "|---|---|---|"]
    for f in dataclasses.fields(schema):
        if skip_groups and nested_schema(schema, f.name) is not None:
            continue
        mark = " *(does not change results)*" if not affects_results(f) else ""
        rows.append(f"| `{f.name}` | `{_cell(_default(f))}` | {_cell(field_help(f))}{mark} |")
    return rows


def _summary(schema: type) -> str:
    return (schema.__doc__ or "").strip().splitlines()[0]


def render() -> str:
    out = [
        "Every key, its default and what it does, from the schema definitions in `src/chatlm/config/`.",
        "Keys marked *does not change results* are left out of the run's config hash, of sweep job",
        "directory names and of `chatlm runs compare`'s columns.",
        "",
    ]
    for stage, schema in STAGE_SCHEMAS.items():
        out += [f"### `{stage}` (conf/{stage}.yaml)", "", _summary(schema), ""]
        out += table(schema, skip_groups=True) + [""]
        groups = [f for f in dataclasses.fields(schema) if nested_schema(schema, f.name) is not None]
        out += [
            "Groups: "
            + ", ".join(f"`{f.name}`" + ("" if affects_results(f) else " (does not change results)") for f in groups),
            "",
        ]
    for group, schema in GROUP_SCHEMAS.items():
        out += [f"### group `{group}`", "", _summary(schema), ""] + table(schema) + [""]
        if schema is DataConfig:  # a list of nested schemas
            out += [f"Each entry of `{group}.sources`:", ""] + table(DataSourceConfig) + [""]
    return "\n".join(out).rstrip() + "\n"


def splice(doc: str, generated: str) -> str:
    """`doc` with its generated part replaced by `generated`."""
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"docs/configs.md lacks the markers {BEGIN!r} and {END!r}")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{generated}{END}{tail}"


def main(argv: list[str]) -> int:
    text = render()
    if "--write" in argv:
        DOC.write_text(splice(DOC.read_text(), text))
        print(f"wrote the reference into {DOC}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
