#!/usr/bin/env python
"""Merge time of a whole 7B-class model, estimated from one tensor of each distinct shape.

A 7B checkpoint has only five distinct matrix shapes (the attention projections, the
key/value projections, the MLP's up/gate and down projections, the embeddings); every
matrix of one shape costs about the same to merge. For each shape this builds synthetic
inputs like ``bench_e2e.py``'s (a base drawn as a transformers init, std 0.02, and
fine-tunes = base + a rank-``--ft-rank`` update at ``--ft-strength`` of the weight's RMS +
dense noise at ``--ft-noise``, ``mergekit_lore.demo.fine_tune_like``), merges them on
``--device`` through mergekit's public ``merge_tensors`` with ``lore`` (defaults, or
``--lore-param NAME=VALUE``), ``ties`` and ``linear`` in the same run, and multiplies each median
time by how many matrices of that shape the model has. The sum is the merge compute of the
whole model: no loading, writing or start-up (``bench_e2e.py`` measures those end to end),
and the 1-D tensors (norms, biases), which every method merges elementwise, are left out.

    python bench/bench_7b.py --arch qwen2.5-7b --device cuda --out results.md
    OMP_NUM_THREADS=1 python bench/bench_7b.py --threads 1 --shapes attention,kv   # a quick part

The paper reports 12 min 24 s (744 s) for merging two 7B models; the table gives the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from common import machine_info, write_report  # noqa: E402  (repository on sys.path)

import torch  # noqa: E402
import yaml  # noqa: E402

import mergekit_lore  # noqa: E402,F401  (registers lore)
from mergekit.merge_methods import merge_tensors  # noqa: E402
from mergekit_lore.demo import fine_tune_like  # noqa: E402

PAPER_SECONDS = 12 * 60 + 24  # the paper's time for two 7B models

# name -> (hidden, intermediate, key/value width, vocab, layers); untied embeddings
ARCHITECTURES: Dict[str, Tuple[int, int, int, int, int]] = {
    "qwen2.5-7b": (3584, 18944, 512, 152064, 28),
    "llama3-8b": (4096, 14336, 1024, 128256, 32),
}


def model_shapes(arch: str) -> Dict[str, Tuple[Tuple[int, int], int]]:
    """Distinct matrix shapes of ``arch``: kind -> ((rows, cols), how many matrices)."""
    hidden, intermediate, kv, vocab, layers = ARCHITECTURES[arch]
    return {
        "attention": ((hidden, hidden), 2 * layers),  # q_proj, o_proj
        "kv": ((kv, hidden), 2 * layers),  # k_proj, v_proj
        "mlp_in": ((intermediate, hidden), 2 * layers),  # gate_proj, up_proj
        "mlp_out": ((hidden, intermediate), layers),  # down_proj
        "embedding": ((vocab, hidden), 2),  # embed_tokens, lm_head
    }


@dataclass
class Row:
    kind: str
    shape: Tuple[int, int]
    count: int
    seconds: Dict[str, List[float]] = field(default_factory=dict)

    def median(self, method: str) -> Optional[float]:
        times = self.seconds.get(method)
        return statistics.median(times) if times else None


def make_inputs(shape: Tuple[int, int], args: argparse.Namespace, seed: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """A base and ``--inputs`` fine-tune-like variants of one weight, in ``--dtype`` on ``--device``."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    dtype = getattr(torch, args.dtype)
    variants = [
        fine_tune_like({"w": base}, seed + 1000 + i, rank=args.ft_rank, strength=args.ft_strength,
                       noise=args.ft_noise)["w"].to(dtype).to(args.device)
        for i in range(args.inputs)
    ]
    return base.to(dtype).to(args.device), variants


def merge_once(method: str, base: torch.Tensor, variants: List[torch.Tensor], args) -> float:
    """Seconds of one ``merge_tensors`` call (the result is finite, or this raises)."""
    n = len(variants)
    if method == "linear":
        tensors, base_index, parameters = variants, None, {"weight": 1.0}
    elif method == "ties":
        tensors, base_index, parameters = variants + [base], n, {"weight": 1.0, "density": 0.5}
    else:  # lore: with the base (anchor) unless --no-base
        with_base = not args.no_base
        tensors = variants + ([base] if with_base else [])
        base_index, parameters = (n if with_base else None), dict(args.lore_params)
    if args.device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    merged = merge_tensors(tensors, method, parameters=parameters, base_index=base_index, name=f"bench.{method}")
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    if not torch.isfinite(merged).all():
        raise RuntimeError(f"{method} gave a non-finite merge of a {tuple(base.shape)} weight")
    return seconds


def report(rows: List[Row], methods: List[str], header: List[str], device: str, shapes: int) -> List[str]:
    """The markdown table: per shape, then the sum (the whole model once all ``shapes`` are in)."""
    lines = list(header) + ["", "| kind | shape | matrices | " + " | ".join(f"{m} s (one)" for m in methods)
                            + " | " + " | ".join(f"{m} s (all)" for m in methods) + " |",
                            "|---|---|---|" + "---|" * (2 * len(methods))]
    totals = {m: 0.0 for m in methods}
    for row in rows:
        one = [row.median(m) for m in methods]
        for m, value in zip(methods, one):
            totals[m] += (value or 0.0) * row.count
        lines.append(f"| {row.kind} | {row.shape[0]} x {row.shape[1]} | {row.count} | "
                     + " | ".join("-" if v is None else f"{v:.3f}" for v in one) + " | "
                     + " | ".join("-" if v is None else f"{v * row.count:.1f}" for v in one) + " |")
    whole = len(rows) == shapes
    lines += ["", ("Whole model" if whole else f"{len(rows)} of the model's {shapes} shapes") + ", merge compute only: "
              + ", ".join(f"{m} {totals[m]:.1f} s" for m in methods) + "."]
    if whole and "lore" in totals and totals["lore"] > 0:
        ratios = [f"{totals['lore'] / totals[m]:.2f}x {m}" for m in methods if m != "lore" and totals[m] > 0]
        lines.append(f"lore: {', '.join(ratios)}; the paper's {PAPER_SECONDS} s for two 7B models is "
                     f"{PAPER_SECONDS / totals['lore']:.1f}x this lore total.")
    if device == "cuda":
        lines.append(f"Peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB.")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="qwen2.5-7b")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--inputs", type=int, default=2, help="fine-tunes merged (default 2)")
    parser.add_argument("--no-base", action="store_true", help="lore without the base (default: base_model, anchor)")
    parser.add_argument("--methods", default="lore,ties,linear")
    parser.add_argument("--shapes", default=None, help="only these kinds (comma list of " + ", ".join(
        model_shapes("qwen2.5-7b")) + ")")
    parser.add_argument("--runs", type=int, default=1, help="merges per method and shape (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ft-rank", type=int, default=16)
    parser.add_argument("--ft-strength", type=float, default=0.05)
    parser.add_argument("--ft-noise", type=float, default=0.002)
    parser.add_argument("--lore-param", action="append", default=[], metavar="NAME=VALUE",
                        help="a lore parameter (repeatable), e.g. tol=1e-4")
    parser.add_argument("--out", default=None, help="markdown report, rewritten after every shape")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lore_params = {name: yaml.safe_load(value) for name, _, value in  # as a mergekit-yaml config reads it
                        (item.partition("=") for item in args.lore_param)}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    shapes = model_shapes(args.arch)
    kinds = [k.strip() for k in args.shapes.split(",")] if args.shapes else list(shapes)
    unknown = [k for k in kinds if k not in shapes]
    if unknown:
        parser.error(f"unknown --shapes {unknown}; choose from {list(shapes)}")
    header = [
        f"# Whole-model merge compute, {args.arch}, estimated per shape ({args.device})",
        "",
        machine_info(args.threads, args.device),
        f"- {args.inputs} fine-tunes ({args.dtype}; rank {args.ft_rank}, strength {args.ft_strength}, noise "
        f"{args.ft_noise}) merged by `merge_tensors`; lore "
        + ("without a base" if args.no_base else "with the base (anchor)")
        + (f", {args.lore_params}" if args.lore_params else ", defaults")
        + f"; ties with the base, density 0.5; {args.runs} run(s) per cell, median",
        f"- command: `bench/bench_7b.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
    ]
    print("\n".join(header), flush=True)
    warm_base, warm_variants = make_inputs((256, 128), args, seed=10_000)
    for method in methods:  # one-time costs (imports, CUDA context and libraries) out of the timings
        merge_once(method, warm_base, warm_variants, args)
    rows: List[Row] = []
    for index, kind in enumerate(kinds):
        shape, count = shapes[kind]
        base, variants = make_inputs(shape, args, seed=index)
        row = Row(kind, shape, count)
        for run in range(args.runs):
            for method in methods:
                seconds = merge_once(method, base, variants, args)
                row.seconds.setdefault(method, []).append(seconds)
                print(f"[{kind} {shape[0]}x{shape[1]}] run {run + 1}: {method} {seconds:.3f} s",
                      file=sys.stderr, flush=True)
        rows.append(row)
        del base, variants
        if args.device == "cuda":
            torch.cuda.empty_cache()
        lines = report(rows, methods, header, args.device, len(shapes))
        write_report(lines, args.out)
    print("\n".join(lines[len(header):]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
