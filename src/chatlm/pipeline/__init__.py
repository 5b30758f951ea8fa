"""Pipelines: several stages run one after the other, each stage's run directory feeding the next
(`spec` reads a pipeline file, `runner` runs it with skipping and resuming, `report` writes the
report card of a pipeline or of one run)."""
