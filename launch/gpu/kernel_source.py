"""Print the Triton source and call sites of the slowest Inductor kernels of a profiled bench run.

Reads a kernels.tsv written by `python -m chatlm.bench ... profile_steps=N` (device ms per step per
kernel, longest first), finds each of its `top` slowest `triton_*` kernels in the Inductor output
code under the cache directory (the generated modules that hold `def call(`), and writes, per
kernel: its time, the comment that names the ATen ops it fuses, its source, and the lines of the
compiled graph that launch it (with the buffer sizes). Used to see why a fused kernel is slow.

    python3 launch/gpu/kernel_source.py KERNELS_TSV OUT_TXT [--top 12] [--cache /tmp/torchinductor_root]
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path


def slowest_triton(tsv: Path, top: int) -> list[tuple[str, float, float, int]]:
    """(slowest kernel, ms/step, calls/step, kernels) per name stem: Inductor numbers each copy of
    a kernel (one per layer) with a suffix, so the copies are summed under their stem."""
    groups: dict[str, list[tuple[str, float, float]]] = {}
    for line in tsv.read_text().splitlines()[1:]:
        ms, calls, _category, name = line.split("\t", 3)
        if name.startswith("triton_"):
            groups.setdefault(re.sub(r"_\d+$", "", name), []).append((name, float(ms), float(calls)))
    rows = [(g[0][0], sum(r[1] for r in g), sum(r[2] for r in g), len(g)) for g in groups.values()]
    return sorted(rows, key=lambda r: -r[1])[:top]


def graph_modules(cache: Path) -> list[tuple[Path, str]]:
    mods = []
    for path in cache.rglob("*.py"):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "def call(" in text and "async_compile.triton(" in text:
            mods.append((path, text))
    return mods


def definition(text: str, name: str) -> str | None:
    """The kernel's `NAME = async_compile.triton(...)` block with the comments just above it."""
    start = text.find(f"{name} = async_compile.triton(")
    if start < 0:
        return None
    head = text.rfind("\n\n", 0, start)
    end = text.find("''', device_str=", start)
    end = text.find("\n", end) if end >= 0 else start + 20000
    return text[head + 2 if head >= 0 else start : end]


def call_sites(text: str, name: str, context: int = 10) -> list[str]:
    lines = text.splitlines()
    sites = []
    for i, line in enumerate(lines):
        if re.search(rf"\b{re.escape(name)}\.run\(", line):
            sites.append("\n".join(lines[max(0, i - context) : i + 1]))
    return sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tsv", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_{os.environ.get('USER', 'root')}")),
    )
    args = ap.parse_args()
    mods = graph_modules(args.cache)
    parts = [f"# {len(mods)} compiled graph modules under {args.cache}\n"]
    for name, ms, calls, copies in slowest_triton(args.tsv, args.top):
        parts.append(
            f"\n{'=' * 100}\n# {name} and {copies - 1} numbered copies: {ms:.3f} ms/step in "
            f"{calls:g} calls/step ({ms / max(calls, 1):.3f} ms per call)\n"
        )
        found = False
        for path, text in mods:
            src = definition(text, name)
            if src is None:
                continue
            found = True
            parts.append(f"# module {path}\n{src}\n")
            for site in call_sites(text, name)[:2]:
                parts.append(f"# --- launched as:\n{site}\n")
            break
        if not found:
            parts.append("# (source not found in the cache)\n")
    args.out.write_text("".join(parts))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
