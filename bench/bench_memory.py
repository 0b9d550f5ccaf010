#!/usr/bin/env python
"""Peak extra host memory of one ``lore`` tensor merge, in units of one fp32 input tensor.

Each case runs in a fresh subprocess: it builds the n inputs (and the base) first,
records the resident set size, merges them through mergekit's public
``mergekit.merge_methods.merge_tensors(..., "lore", parameters=...)``, and
reports ``(peak RSS - RSS before the merge) / (4 * rows * cols)``. The inputs
themselves are not counted (mergekit holds them either way); the output is.

    python bench/bench_memory.py                     # 4096x11008, n = 2 and 3
    python bench/bench_memory.py --shape 2048x5504 --out bench/results/memory_cpu.md

Linux only (reads ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from common import REPO  # noqa: E402,F401  (repository on sys.path)

CASES = [
    # (label, inputs, dtype, parameters, with base)
    ("sum, no base (defaults)", 2, "float32", {}, False),
    ("sum, no base (defaults)", 3, "float32", {}, False),
    ("sum, base anchor", 3, "float32", {}, True),
    ("sum, no base, bf16 inputs", 3, "bfloat16", {}, False),
    ("svt_backend gram", 3, "float32", {"svt_backend": "gram"}, False),
    ("combine ties", 3, "float32", {"combine": "ties", "density": 0.5}, False),
]


def child(spec: Dict[str, object]) -> None:
    """Runs in the subprocess: one merge through mergekit's public API, prints JSON."""
    import torch

    import common  # noqa: F401  (repository on sys.path)
    import mergekit_lore  # noqa: F401  (registers lore)
    from mergekit.merge_methods import merge_tensors

    torch.set_num_threads(int(spec["threads"]))
    rows, cols = spec["shape"]
    n = int(spec["inputs"])
    dtype = getattr(torch, str(spec["dtype"]))
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=generator) * 0.02
    thetas = []
    for _ in range(n):
        left = torch.randn(rows, 16, generator=generator)
        right = torch.randn(16, cols, generator=generator)
        update = (left @ right) * (0.01 / 16) + torch.randn(rows, cols, generator=generator) * 0.001
        thetas.append((base + update).to(dtype))
    del left, right, update
    tensors = thetas + ([base.to(dtype)] if spec["base"] else [])
    del base
    parameters = {"mu_ratio": 0.2, "lambda": 0.5, "base_weight": 1.0, **dict(spec["parameters"])}
    before = _rss_kib()
    _reset_peak()
    began = time.perf_counter()
    merged = merge_tensors(tensors, "lore", parameters=parameters,
                           base_index=n if spec["base"] else None, name="bench.weight")
    seconds = time.perf_counter() - began
    peak = _peak_kib()
    unit = 4 * rows * cols / 1024
    print(json.dumps({"extra_inputs": (peak - before) / unit, "seconds": seconds,
                      "peak_gib": peak / 2**20, "out_shape": list(merged.shape)}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (the RSS high-water mark) on Linux >= 4.0.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_kib() -> int:
    return _status_kib("VmHWM")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x11008", help="ROWSxCOLS of the weight")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--only", default=None, help="run only cases whose label contains this text")
    parser.add_argument("--inputs", default=None, help="run only these input counts (comma list)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    lines = [
        "# Peak extra memory of one lore tensor merge (CPU)",
        "",
        f"Weight {rows}x{cols}; unit = one fp32 copy of it ({4 * rows * cols / 2**20:.0f} MiB). "
        "Peak RSS during `lore_merge` minus RSS before it (inputs already in memory, output "
        "included); mu_ratio 0.2, lambda 0.5, fista, base_weight 1. "
        f"Command: `python bench/bench_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| case | inputs | peak extra (fp32 input copies) | peak RSS GiB | merge s |",
        "|---|---|---|---|---|",
    ]
    counts = {int(v) for v in args.inputs.split(",")} if args.inputs else None
    for label, n, dtype, parameters, base in CASES:
        if (args.only and args.only not in label) or (counts and n not in counts):
            continue
        spec = {"shape": [rows, cols], "inputs": n, "dtype": dtype, "parameters": parameters,
                "base": base, "threads": args.threads}
        # A fixed mmap threshold makes glibc return every freed block above 64 KiB to the
        # OS at once, so RSS tracks live memory instead of a reused heap.
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env, cwd=Path(__file__).resolve().parent)
        if done.returncode != 0:
            raise SystemExit(f"{label} (n={n}) failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        lines.append(f"| {label} | {n} | {result['extra_inputs']:.2f} | {result['peak_gib']:.2f} | {result['seconds']:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
