"""Every config file composes and validates; bad input fails at composition with a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from chatlm import config as C
from chatlm.config.tree import conf_dir, group_options
from chatlm.errors import UsageError
from chatlm.hydra.app import to_typed
from chatlm.hydra.overrides import check_overrides
from chatlm.hydra.store import safe_dirname

TRAIN_GROUPS = [
    "model",
    "optim",
    "schedule",
    "data",
    "tokenizer",
    "hardware",
    "precision",
    "logger",
    "paths",
    "cluster",
    "experiment",
    "sweep",
    "debug",
]


def test_every_group_has_a_schema_and_options():
    for group in TRAIN_GROUPS:
        assert group in C.GROUP_SCHEMAS, group
        assert group_options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("group", TRAIN_GROUPS)
def test_every_option_composes_and_validates(compose, group):
    for option in group_options(group):
        cfg = compose("train", [f"{group}={option}"])
        typed = to_typed(cfg)
        assert isinstance(typed, C.TrainConfig)
        node = getattr(typed, group)
        assert isinstance(node, C.GROUP_SCHEMAS[group])
        # each option names itself, so runs record which preset they used
        if group != "paths":
            assert node.name == option, f"{group}/{option}.yaml sets name={node.name!r}"


def test_check_stage_composes_every_hardware_option(compose):
    for option in group_options("hardware"):
        typed = to_typed(compose("check", [f"hardware={option}"]))
        assert isinstance(typed, C.CheckConfig) and typed.hardware.name == option


@pytest.mark.parametrize("launcher", ["local", "slurm_h100", "slurm_h100_2node"])
def test_launcher_presets_follow_hardware(compose, launcher):
    cfg = compose("train", [f"hydra/launcher={launcher}", "hardware=h100x8"], hydra_node=True)
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher_cfg["tasks_per_node"] == 8
    if launcher != "local":
        assert launcher_cfg["gpus_per_node"] == 8 and launcher_cfg["max_num_timeout"] == 5
        assert launcher_cfg["nodes"] == (2 if launcher.endswith("2node") else 1)
        assert launcher_cfg["_target_"].endswith("SlurmLauncher")


def test_cluster_preset_sets_launcher_hardware_and_multirun(compose):
    cfg = compose("train", ["cluster=slurm_h100"], hydra_node=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hardware.name == "h100x8" and cfg.cluster.name == "slurm_h100"
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    # a command-line group choice still wins over the preset's
    cfg = compose("train", ["cluster=slurm_h100", "hardware=h200x2"], hydra_node=True)
    assert cfg.hardware.name == "h200x2" and cfg.hydra.launcher.tasks_per_node == 2


def test_sweep_presets_declare_grids(compose):
    cfg = compose("train", ["sweep=softcap"], hydra_node=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params["model.softcap"] == "10,15,20"
    assert to_typed(compose("train", ["sweep=depths"])).sweep.name == "depths"


def test_experiments_override_groups(compose):
    q = to_typed(compose("train", ["experiment=quickstart"]))
    assert (q.model.name, q.hardware.name, q.tokenizer.vocab_size, q.steps) == ("d4", "cpu", 8192, 120)
    s = to_typed(compose("train", ["experiment=speedrun"]))
    assert (s.model.depth, s.precision.fp8, s.target_param_data_ratio, s.hardware.nproc_per_node) == (24, True, 8.0, 8)


def test_defaults_are_nanochats(compose):
    t = to_typed(compose("train"))
    m, o, s = t.model, t.optim, t.schedule
    assert (m.depth, m.aspect_ratio, m.head_dim, m.sequence_len, m.window_pattern) == (20, 64, 128, 2048, "SSSL")
    assert (m.softcap, m.qk_scale, m.rope_base, m.ve_gate_channels, m.ve_gate_range, m.smear_channels) == (
        15.0,
        1.2,
        100000.0,
        12,
        3.0,
        24,
    )
    assert (m.backout_init, m.wte_init_std, m.lm_head_init_std, m.fc_init_scale) == (0.2, 0.8, 0.001, 0.4)
    assert (o.embedding_lr, o.unembedding_lr, o.matrix_lr, o.scalar_lr, o.weight_decay) == (0.3, 0.008, 0.02, 0.5, 0.28)
    assert (s.warmup_steps, s.warmdown_ratio, s.final_lr_frac) == (40, 0.65, 0.05)
    assert t.target_param_data_ratio == 12.0 and t.tokenizer.vocab_size == 32768
    assert r"\p{N}{1,2}" in t.tokenizer.split_pattern and t.tokenizer.special_tokens[0] == "<|bos|>"


def test_resolve_fills_paths_from_env(compose, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATLM_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("CHATLM_OUTPUT_ROOT", str(tmp_path / "o"))
    cfg = compose("train")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["data_dir"] == str(tmp_path / "c" / "data")
    assert resolved["paths"]["output_root"] == str(tmp_path / "o")
    assert "${" not in OmegaConf.to_yaml(cfg, resolve=True)


_KEY = re.compile(r"^\s*(-\s+)?(override\s+)?[\w./@-]+\s*:")


def yaml_files() -> list[Path]:
    return sorted(conf_dir().rglob("*.yaml"))


def test_every_yaml_key_has_a_comment():
    missing = []
    for path in yaml_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip().startswith("#") or not line.strip():
                continue
            if _KEY.match(line) and "#" not in line:
                missing.append(f"{path.relative_to(conf_dir())}:{n}: {line.strip()}")
    assert not missing, "YAML keys without a comment:\n" + "\n".join(missing)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UsageError, match=r"Did you mean 'model\.softcap'"):
        check_overrides("train", ["model.sofcap=10"])
    with pytest.raises(UsageError, match=r"'stepz' is not a key of the top level.*Did you mean 'steps'"):
        check_overrides("train", ["stepz=3"])
    with pytest.raises(UsageError, match=r"Did you mean 'model\.softcap'"):
        check_overrides("train", ["+model.sofcap=10"])
    # real keys, group choices, sweeps and hydra keys pass
    check_overrides(
        "train",
        [
            "model.softcap=10,20",
            "model=d12",
            "hydra.launcher.partition=x",
            "seed=1",
            "data.sources.0.weight=2",
            "hydra/launcher=local",
            "--cfg",
            "job",
        ],
    )


def test_wrong_type_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", ["model.depth=abc"])
    assert "model.depth" in str(e.value.__cause__) and "Integer" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", ["hardware.device=cuuda"])
    assert "expected one of [auto, cpu, cuda, mps]" in str(e.value.__cause__)


def test_unknown_option_lists_the_valid_ones(compose):
    with pytest.raises(MissingConfigException) as e:
        compose("train", ["model=d25x"])
    message = str(e.value)
    assert "model/d25x" in message and all(opt in message for opt in ("d12", "d24", "tiny"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.window_pattern=SXL", "model.window_pattern"),
        ("model.short_window=4096", "model.short_window"),
        ("hardware.nproc_per_node=0", "hardware.nproc_per_node"),
        ("schedule.warmdown_ratio=1.5", "schedule.warmdown_ratio"),
        ("optim.lm_head_betas=[0.9]", "optim.lm_head_betas"),
        ("steps=0", "steps"),
        ("run_name=a/b", "run_name"),
    ],
)
def test_semantic_errors_name_the_key(compose, override, key):
    with pytest.raises(C.ConfigError) as e:
        to_typed(compose("train", [override]))
    assert e.value.key == key and str(e.value).startswith(key + ":")


def test_safe_dirname():
    assert safe_dirname("model.softcap=10,seed=1") == "model.softcap=10,seed=1"
    assert "/" not in safe_dirname("init_from=outputs/train/latest")
    long = safe_dirname("x=" + "a" * 500)
    assert len(long) == 120 and long != safe_dirname("x=" + "a" * 499)
    assert safe_dirname("") == "default"


def _all_schemas() -> list[type]:
    import dataclasses

    from chatlm.config.keys import nested_schema

    seen, todo = [], [*C.STAGE_SCHEMAS.values(), *C.GROUP_SCHEMAS.values(), C.DataSourceConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        todo += [t for f in dataclasses.fields(cls) if (t := nested_schema(cls, f.name)) is not None]
    return seen


def test_every_field_has_a_description():
    import dataclasses

    from chatlm.config.fields import field_help

    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in _all_schemas()
        for f in dataclasses.fields(cls)
        if not field_help(f).strip()
    ]
    assert not missing, missing


def test_docs_configs_md_is_generated_from_the_schemas():
    from chatlm.config.reference import BEGIN, DOC, END, render

    doc = DOC.read_text()
    generated = doc.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")
    assert generated == render(), "docs/configs.md is stale: run python -m chatlm.config.reference --write"
    assert "| `softcap` | `15.0` | logit softcap" in generated and "*(does not change results)*" in generated


def test_results_declarations_drive_hash_dirname_and_compare():
    from chatlm.config.keys import dirname_exclusions, is_result_key, non_result_keys
    from chatlm.hydra.store import excluded_from_dirname

    assert set(non_result_keys(C.TrainConfig)) == {
        "resume",
        "tags",
        "paths",
        "hardware",
        "logger",
        "cluster",
        "core_bundle",
        "chat_eval.batch_size",
        "chat_eval.max_batch_tokens",
        "chat_eval.data_dir",
        "chat_eval.core_bundle",
        "chat_eval.sandbox_workers",
        "stop_at_step",
    }
    assert "hardware" not in non_result_keys(C.BenchConfig)  # the benchmark measures the hardware
    assert {"hardware.device_batch_size", "paths.output_root", "logger.kind"} <= set(dirname_exclusions(C.TrainConfig))
    assert excluded_from_dirname("train") == list(dirname_exclusions(C.TrainConfig))
    assert not is_result_key(C.TrainConfig, "hardware.compile") and is_result_key(C.TrainConfig, "model.depth")


def test_sweep_dirnames_leave_out_non_result_keys(compose):
    cfg = compose("train", ["hardware.device_batch_size=8", "model.softcap=10"], hydra_node=True)
    exclude = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert "hardware.device_batch_size" in exclude and "model.softcap" not in exclude
