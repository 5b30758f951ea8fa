"""Evaluation: bits per byte on held-out batches (spec §6.1)."""

from chatlm.evals.bpb import evaluate_bpb

__all__ = ["evaluate_bpb"]
