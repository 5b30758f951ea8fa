"""A pipeline file (`conf/pipeline/<name>.yaml`, or any path): setup commands and stages.

```yaml
name: quickstart
description: one line
vars:                        # {{name}} in any argument; `chatlm pipeline run ... --var name=value`
  steps: 120
setup:                       # commands run first, e.g. fetching data
  - name: evals
    run: [chatlm, fetch, evals]
    best_effort: true        # a failure is reported; stages that need it are skipped, not failed
stages:
  - name: base               # also the stage's run directory: <pipeline dir>/base
    app: train               # python -m chatlm.<app>
    args: [experiment=quickstart, "steps={{steps}}"]
  - name: sft
    app: sft
    args: ["init_from={{base}}"]   # {{<stage>}} is that stage's run directory
    needs: [evals]           # setup items that must have succeeded, else the stage is skipped ...
    without:                 # ... unless it says which arguments replace a failed one's
      sft_data: [mixture=generated]
    optional: true           # run only with --with sft (or --with all)
```

An argument that is exactly one var whose value is overrides (`"{{base}}"` with
`base: experiment=quickstart steps=60`: every word has an `=`) becomes one argument per override
(shell quoting), so one var can carry several.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from chatlm.errors import UsageError

#: stages whose apps write a run directory and resume in it (`resume=auto`)
RESUMABLE = ("train", "sft", "rl")
#: stages whose apps write a run directory but start over when interrupted
RESTARTED = ("tokenize", "eval")
#: stages without a run directory: their output is kept in <pipeline dir>/<name>.txt
PLAIN = ("chat",)
APPS = (*RESUMABLE, *RESTARTED, *PLAIN)

_REF = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_|]*)\s*\}\}")


@dataclass
class Setup:
    name: str
    run: list[str]
    best_effort: bool = False


@dataclass
class Stage:
    name: str
    app: str
    args: list[str]
    needs: list[str] = field(default_factory=list)
    optional: bool = False
    without: dict[str, list[str]] = field(default_factory=dict)  # failed setup -> arguments added instead

    @property
    def has_run_dir(self) -> bool:
        return self.app not in PLAIN


@dataclass
class Pipeline:
    name: str
    description: str
    vars: dict[str, str]
    setup: list[Setup]
    stages: list[Stage]
    source: str

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def pipeline_file(name_or_path: str, conf_dir: Path) -> Path:
    """A path as given, else `<conf_dir>/pipeline/<name>.yaml`."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UsageError(f"pipeline file {path} does not exist")
        return path
    shipped = conf_dir / "pipeline" / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in (conf_dir / "pipeline").glob("*.yaml"))
        raise UsageError(f"no pipeline {name_or_path!r}; shipped: {', '.join(names)} (or give a .yaml path)")
    return shipped


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise UsageError(f"{where}: must be a list of strings")
    return [str(v) for v in value]


def load_pipeline(path: Path) -> Pipeline:
    """Read and check a pipeline file; every problem is one line naming the file and the entry."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: cannot read the pipeline ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise UsageError(f"{path}: a pipeline needs a non-empty 'stages' list")
    setups = []
    for i, item in enumerate(data.get("setup") or []):
        where = f"{path}: setup[{i}]"
        if not isinstance(item, dict) or not item.get("name"):
            raise UsageError(f"{where}: needs a name")
        setups.append(
            Setup(str(item["name"]), _strings(item.get("run"), f"{where}.run"), bool(item.get("best_effort")))
        )
    stages: list[Stage] = []
    names = {s.name for s in setups}
    for i, item in enumerate(data["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(item, dict) or not item.get("name"):
            raise UsageError(f"{where}: needs a name")
        name, app = str(item["name"]), str(item.get("app", ""))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in names:
            raise UsageError(f"{where}: name {name!r} must be a unique identifier")
        if app not in APPS:
            raise UsageError(f"{where} ({name}): app must be one of {', '.join(APPS)}, got {app!r}")
        needs = _strings(item.get("needs") or [], f"{where}.needs")
        unknown = [n for n in needs if n not in {s.name for s in setups}]
        if unknown:
            raise UsageError(f"{where} ({name}): needs {unknown}, which no setup entry provides")
        without = item.get("without") or {}
        if not isinstance(without, dict) or any(k not in needs for k in without):
            raise UsageError(f"{where} ({name}): without must map names listed in needs to argument lists")
        alternatives = {str(k): _strings(v, f"{where}.without.{k}") for k, v in without.items()}
        args = _strings(item.get("args") or [], f"{where}.args")
        stages.append(Stage(name, app, args, needs, bool(item.get("optional")), alternatives))
        names.add(name)
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        raise UsageError(f"{path}: vars must be a mapping of names to values")
    clash = sorted(set(map(str, variables)) & names)
    if clash:
        raise UsageError(f"{path}: vars {clash} have the names of stages or setup entries: rename them")
    return Pipeline(
        name=str(data.get("name") or path.stem),
        description=str(data.get("description") or ""),
        vars={str(k): str(v) for k, v in variables.items()},
        setup=setups,
        stages=stages,
        source=str(path),
    )


def parse_vars(items: Optional[list[str]], pipeline: Pipeline) -> dict[str, str]:
    """`--var name=value` items over the pipeline's vars; an unknown name is refused."""
    out = dict(pipeline.vars)
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--var {item!r}: expected NAME=VALUE")
        if name not in out:
            raise UsageError(
                f"--var {name}: the pipeline has no such var; its vars: {', '.join(sorted(out)) or 'none'}"
            )
        out[name] = value
    return out


def substitute(text: str, values: dict[str, str], where: str) -> str:
    """`{{name}}` -> values[name] (vars and the run directories of earlier stages that ran);
    `{{a|b}}` -> the first of a, b that has a value."""

    def one(m: re.Match) -> str:
        for key in m.group(1).split("|"):  # {{rl|sft}}: the first that ran
            if key in values:
                return values[key]
        raise UsageError(f"{where}: {{{{{m.group(1)}}}}} names no var and no earlier stage that ran")

    return _REF.sub(one, text)
