"""Compare the loss curves of the runs launch/gpu/correctness.sh copied into a directory.

    python launch/gpu/compare_curves.py DIR      # DIR/<name>.metrics.jsonl for each run

Prints, for every pair of runs with the same number of steps: the largest and the mean absolute
difference of the training loss per step, the difference of the final smoothed loss and of every
validation bpb, and writes DIR/compare.json.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path


def curves(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    loss, bpb = {}, {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            loss[row["step"]] = row["loss"]
        if "val_bpb" in row:
            bpb[row["step"]] = row["val_bpb"]
    return loss, bpb


def main(folder: str) -> None:
    runs = {p.name[: -len(".metrics.jsonl")]: curves(p) for p in sorted(Path(folder).glob("*.metrics.jsonl"))}
    results = []
    for (a, (la, ba)), (b, (lb, bb)) in itertools.combinations(runs.items(), 2):
        steps = sorted(set(la) & set(lb))
        if not steps:
            continue
        diffs = [abs(la[s] - lb[s]) for s in steps]
        tail = steps[-20:]
        res = {
            "a": a,
            "b": b,
            "steps": len(steps),
            "max_abs_loss_diff": max(diffs),
            "mean_abs_loss_diff": sum(diffs) / len(diffs),
            "last20_mean_loss": [sum(la[s] for s in tail) / len(tail), sum(lb[s] for s in tail) / len(tail)],
            "val_bpb": {s: [ba[s], bb[s]] for s in sorted(set(ba) & set(bb))},
        }
        results.append(res)
        print(
            f"{a} vs {b}: {len(steps)} steps | max |dloss| {res['max_abs_loss_diff']:.4f} | mean |dloss| "
            f"{res['mean_abs_loss_diff']:.4f} | last-20 mean loss {res['last20_mean_loss'][0]:.4f} vs "
            f"{res['last20_mean_loss'][1]:.4f} | val bpb "
            + ", ".join(f"@{s}: {x:.4f}/{y:.4f}" for s, (x, y) in res["val_bpb"].items())
        )
    (Path(folder) / "compare.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
