"""Everything that touches Hydra, and nothing else does.

- `app`: `run_stage(stage, body)`, the entry of every stage app: compose -> typed config -> ranks
  (`chatlm.runtime.dist`) -> run directory (`chatlm.runtime.rundir`) -> `body(cfg, run)`.
- `overrides`: a command line checked against the schemas before Hydra runs ("did you mean").
- `store`: the schemas in Hydra's ConfigStore and the `chatlm_*` resolvers conf/hydra uses.
- `callbacks`: the sweep summary written when a multirun ends.
- `launcher`: chatlm's submitit launchers (checks before submitting, sweep.json, killed jobs).
- `retry`: `chatlm runs retry`, which expands a sweep's points as Hydra does and re-launches them.

The library (model, optim, data, tokenizer, training, runtime, runs, evals, engine) never imports
this package or Hydra; tests/test_layering.py walks the imports to keep it so.
"""
