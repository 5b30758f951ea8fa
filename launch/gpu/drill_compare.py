"""The resume drill's report: how the run went, the losses around the resume step and every
evaluation; with a reference (the same run without a stop) the largest loss difference before
and after the resume step, and the val bpb of both.

usage: python launch/gpu/drill_compare.py --stop 100 [--run-json run.json] [--reference ref.jsonl] metrics.jsonl

GPU training is not bitwise repeatable by default (hardware.deterministic=true makes it so), so
read the difference after the resume against the one before it: a state lost or restored wrongly
shows as a jump at the first steps after the resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compare_curves import curves  # launch/gpu/compare_curves.py: (step -> loss, step -> val bpb)


def compare(drill: Path, reference: Path, stop: int) -> dict:
    (loss, bpb), (ref_loss, ref_bpb) = curves(drill), curves(reference)
    out: dict = {"stop": stop}
    for name, keep in (("before", lambda s: s <= stop), ("after", lambda s: s > stop)):
        steps = [s for s in sorted(ref_loss) if keep(s) and s in loss]
        diffs = [abs(loss[s] - ref_loss[s]) for s in steps]
        out[f"max_abs_dloss_{name}"] = max(diffs) if diffs else None
        out[f"steps_{name}"] = len(diffs)
    out["first_steps_after"] = {
        s: loss[s] - ref_loss[s] for s in range(stop + 1, stop + 4) if s in loss and s in ref_loss
    }
    out["val_bpb"] = {s: (bpb[s], ref_bpb[s]) for s in sorted(bpb) if s in ref_bpb}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", type=Path, help="the drill's metrics.jsonl")
    ap.add_argument("--stop", type=int, required=True, help="the step the drill stopped and resumed at")
    ap.add_argument("--run-json", type=Path, help="the drill's run.json (status and attempts)")
    ap.add_argument("--reference", type=Path, help="metrics.jsonl of the same run without a stop")
    ap.add_argument("--json", type=Path, help="also write the comparison here")
    args = ap.parse_args(argv)
    if args.run_json:
        r = json.loads(args.run_json.read_text())
        print("status", r["status"], "| attempts", [(a["status"], a.get("world_size")) for a in r["attempts"]])
        print("final", {k: r.get("final_metrics", {}).get(k) for k in ("steps", "val_bpb", "train_loss")})
    loss, bpb = curves(args.metrics)
    print("loss around the resume:", {s: round(loss[s], 4) for s in sorted(loss) if abs(s - args.stop) <= 3})
    print("val bpb:", {s: round(v, 4) for s, v in sorted(bpb.items())})
    if args.reference:
        c = compare(args.metrics, args.reference, args.stop)
        for name in ("before", "after"):
            m = c[f"max_abs_dloss_{name}"]
            print(
                f"max |loss - reference| {name} the resume: "
                + ("n/a" if m is None else f"{m:.4f}")
                + f" over {c[f'steps_{name}']} steps"
            )
        print("loss - reference right after the resume:", {s: round(d, 4) for s, d in c["first_steps_after"].items()})
        print("val bpb (drill, reference):", {s: (round(a, 4), round(b, 4)) for s, (a, b) in c["val_bpb"].items()})
        if args.json:
            args.json.write_text(json.dumps(c, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
