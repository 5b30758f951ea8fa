"""`setting(...)`: a dataclass field with its one-line description and what it affects.

Every field of every schema is declared with `setting`, so its documentation lives next to its
default, and whether it changes what a run computes is declared once, here, on the field:

- `results=False`: the key says where or how a run executes (paths, hardware, loggers, resume...),
  not what it computes. The run's config hash, Hydra's sweep-job directory names and
  `chatlm runs compare` leave such keys out (see `chatlm.config.keys`). A stage can re-declare a
  field with another value (the benchmark's `hardware` changes its results).
- `architecture=False` (model fields only): the same function of the same weights, e.g. a kernel
  choice or a label. A checkpoint loads into a model whose config differs only in such fields.

`docs/configs.md` is generated from these declarations (`python -m chatlm.config.reference`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

HELP = "help"
RESULTS = "results"
ARCHITECTURE = "architecture"


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Optional[Callable[[], Any]] = None,
    results: bool = True,
    architecture: bool = True,
) -> Any:
    """A documented dataclass field. `factory` builds mutable defaults (lists, nested configs)."""
    if not help:
        raise ValueError("every setting needs a one-line description")
    metadata = {HELP: help, RESULTS: results, ARCHITECTURE: architecture}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_help(field: dataclasses.Field) -> str:
    return str(field.metadata.get(HELP, ""))


def affects_results(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(RESULTS, True))


def is_architecture(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(ARCHITECTURE, True))
