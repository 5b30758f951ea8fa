"""Training, shared by pretraining, SFT, RL and the benchmark.

- `trainer`: `Trainer.step()` (one optimizer step with gradient accumulation) and `Trainer.fit()`;
- `state`: `TrainState`, the counters a checkpoint restores;
- `hooks`: validation, samples, checkpoints, logging, profiling, stop signals, GC, as objects with a cadence;
- `checkpointing`: a Trainer into a checkpoint and back (`CheckpointHook`, `restore`);
- `build`: the model, optimizer and schedule every stage builds the same way;
- `plan`: the derived sizes, batch and horizon; `estimate`: time and memory before a run starts;
- `batches`: repeated and synthetic batch streams; `pretrain`: the pretraining recipe.
"""
