"""What the `results` and `architecture` declarations on the schema fields imply (see
`chatlm.config.fields`): the one place that answers "does this key change what a run computes?".

- the run's config hash (`chatlm.runtime.rundir.config_hash`) drops `non_result_keys`;
- Hydra's sweep-job directory names leave out `dirname_exclusions` (conf/hydra/default.yaml asks
  the `chatlm_dirname_exclusions` resolver);
- `chatlm runs compare` / `runs ls` show differing non-result keys apart from the columns;
- a checkpoint loads into a model config that differs only in `non_architecture_fields`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Iterator, Optional

from chatlm.config.fields import affects_results, is_architecture
from chatlm.config.model import ModelConfig
from chatlm.config.registry import stage_schema


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def nested_schema(cls: type, name: str) -> Optional[type]:
    """The dataclass type of field `name` of `cls`, if it is one."""
    t = _hints(cls).get(name)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Optional[type]]]:
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f, nested_schema(cls, f.name)


@functools.cache
def non_result_keys(schema: type) -> tuple[str, ...]:
    """Dotted keys declared `results=False` (a group node counts as one key; its subtree goes with it)."""
    out: list[str] = []

    def visit(cls: type, prefix: str) -> None:
        for path, f, sub in _walk(cls, prefix):
            if not affects_results(f):
                out.append(path)
            elif sub is not None:
                visit(sub, path + ".")

    visit(schema, "")
    return tuple(out)


@functools.cache
def dirname_exclusions(schema: type) -> tuple[str, ...]:
    """Every override key Hydra must leave out of a sweep job's directory name: the non-result keys
    and each key below them (Hydra matches whole keys, so `hardware` does not cover
    `hardware.device_batch_size`)."""
    out: list[str] = []

    def below(cls: type, prefix: str) -> None:
        for path, _, sub in _walk(cls, prefix):
            out.append(path)
            if sub is not None:
                below(sub, path + ".")

    for key in non_result_keys(schema):
        out.append(key)
        sub = _schema_at(schema, key)
        if sub is not None:
            below(sub, key + ".")
    return tuple(out)


def _schema_at(schema: type, dotted: str) -> Optional[type]:
    cls: Optional[type] = schema
    for part in dotted.split("."):
        if cls is None or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = nested_schema(cls, part)
    return cls


def is_result_key(schema: type, dotted: str) -> bool:
    """False when `dotted` is (under) a key declared `results=False`."""
    return not any(dotted == k or dotted.startswith(k + ".") for k in non_result_keys(schema))


def stage_non_result_keys(stage: object) -> tuple[str, ...]:
    return non_result_keys(stage_schema(stage))


def without_non_result_keys(cfg: dict) -> dict:
    """A copy of a resolved config (a plain dict) without the keys its stage declares non-result."""
    import copy

    view = copy.deepcopy(cfg)
    for key in stage_non_result_keys(cfg.get("stage")):
        node: Any = view
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return view


@functools.cache
def non_architecture_fields() -> frozenset[str]:
    """ModelConfig fields that name or select kernels for the same function of the same weights."""
    return frozenset(f.name for f in dataclasses.fields(ModelConfig) if not is_architecture(f))
