#!/usr/bin/env python
"""End-to-end benchmark: ``mergekit-yaml`` wall time of ``lore`` vs ``linear`` and ``ties``.

One script, one run:

1. Builds (once, cached in ``--workdir``) a synthetic Llama checkpoint with
   7B-like aspect ratios scaled down (default hidden 1024, intermediate 2752,
   4 layers, 8 heads of 128, 32000 vocab, untied embeddings: 117M parameters,
   0.47 GB per model in float32), plus fine-tune-like variants
   (``mergekit_lore.demo.fine_tune_like``: base + planted low-rank update per
   matrix + small dense noise).
2. For 2 and 3 inputs (``--inputs``) times the real ``mergekit-yaml``
   subprocess (median of ``--runs``; runs are interleaved across configs so
   background load hits every method alike) for:
   ``linear``; ``ties`` (base given, density 0.5); ``lore`` default (no base:
   fista, svt_backend auto); ``lore`` with ``svt_backend`` exact / gram /
   randomized; ``lore`` with ``solver: cd``; and ``lore`` with the base as
   ``base_model`` (``base_mode: anchor``, the default when a base is given).
3. Runs each ``lore`` config once more in-process through
   ``mergekit.merge.run_merge`` with timing instrumentation to split the time:
   ``load`` (``LoadTensor.execute``), ``merge`` (every other graph task,
   i.e. the merge method itself), ``write`` (``SaveTensor`` /
   ``TensorWriterTask`` / ``FinalizeModel``) and ``other`` (the rest of
   ``run_merge``: architecture lookup, planning, config/tokenizer copy). Inside
   ``merge``, ``LoreMerge.merge_group`` is split into ``svt`` (calls of
   ``mergekit_lore.svt.svt`` made by the dense solver), ``thresholds``
   (``top_singular`` for ``mu_ratio``), matrix-free products
   (``ResidualProducts``), small solves (the batched FISTA, restricted or on
   whole small matrices) and the rest (solver bookkeeping, combine, dtype
   casts). ``linear`` and ``ties`` are split the same way for comparison.
   The in-process totals exclude interpreter start-up and imports, which the
   subprocess times include.

``--profile DIR`` also writes a cProfile of every in-process ``lore`` run.

Examples::

    python bench/bench_e2e.py                                   # defaults, ~15 min on 2 cores
    python bench/bench_e2e.py --layers 2 --vocab 8000 --runs 1  # quick check
    python bench/bench_e2e.py --cuda --hidden 4096 --intermediate 11008 --layers 8
    python bench/bench_e2e.py --out bench/results/perf_cpu_e2e.md
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import functools
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from common import REPO, machine_info as common_machine_info, run_mergekit_yaml  # noqa: E402
from mergekit_lore.demo import (  # noqa: E402
    TinyLlamaShape,
    build_family,
    lore_config_yaml,
)

DEFAULT_WORKDIR = REPO / "bench" / "results-local" / "e2e"

# Named input families (``--family``): the planted update's rank, its strength and the
# dense noise (both relative to each weight's RMS, i.e. a fraction of its Frobenius
# norm), the shared fraction of the update (task-vector cosine) and the storage dtype.
FAMILIES: Dict[str, Dict[str, object]] = {
    "A": dict(ft_rank=8, ft_strength=0.5, ft_noise=0.02, ft_shared=0.0, dtype="float32", intermediate=2752),
    "B": dict(ft_rank=16, ft_strength=0.05, ft_noise=0.002, ft_shared=0.0, dtype="bfloat16", intermediate=2816),
    "C": dict(ft_rank=64, ft_strength=0.10, ft_noise=0.001, ft_shared=0.0, dtype="float32", intermediate=2816),
    "D": dict(ft_rank=8, ft_strength=0.01, ft_noise=0.001, ft_shared=0.0, dtype="bfloat16", intermediate=2816),
    "E": dict(ft_rank=32, ft_strength=0.03, ft_noise=0.005, ft_shared=0.0, dtype="float32", intermediate=2816),
    "F": dict(ft_rank=16, ft_strength=0.10, ft_noise=0.02, ft_shared=0.0, dtype="bfloat16", intermediate=2816),
    "G": dict(ft_rank=16, ft_strength=0.05, ft_noise=0.002, ft_shared=0.55, dtype="bfloat16", intermediate=2816),
    # noise-dominated: the threshold falls near the noise bulk's edge, so kept ranks pass the planted rank
    "H": dict(ft_rank=32, ft_strength=0.03, ft_noise=0.02, ft_shared=0.0, dtype="float32", intermediate=2816),
}


@dataclass
class Config:
    name: str
    method: str  # linear | ties | lore
    inputs: int
    yaml: str
    times: List[float] = field(default_factory=list)
    failed: str = ""
    split: Optional[Dict[str, float]] = None
    stats: Optional[Dict[str, object]] = None

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


def make_configs(family: Dict[str, object], inputs: int, dtype: str) -> List[Config]:
    models = family["models"][:inputs]
    base = family["base"]
    configs = [
        Config("linear", "linear", inputs,
               lore_config_yaml(models, method="linear", per_model=[{"weight": 1.0}] * inputs, dtype=dtype)),
        Config("ties (base, density 0.5)", "ties", inputs,
               lore_config_yaml(models, base=base, method="ties",
                                per_model=[{"weight": 1.0, "density": 0.5}] * inputs, dtype=dtype)),
        Config("lore default (no base; fista, auto)", "lore", inputs, lore_config_yaml(models, dtype=dtype)),
    ]
    for backend in ("exact", "gram", "randomized"):
        configs.append(
            Config(f"lore svt_backend={backend}", "lore", inputs,
                   lore_config_yaml(models, parameters={"svt_backend": backend}, dtype=dtype))
        )
    configs.append(Config("lore solver=cd", "lore", inputs,
                          lore_config_yaml(models, parameters={"solver": "cd"}, dtype=dtype)))
    configs.append(Config("lore base_model (anchor)", "lore", inputs,
                          lore_config_yaml(models, base=base, dtype=dtype)))
    # a tighter stopping tolerance than the default, to show what tol costs and buys (see bench/results)
    configs.append(Config("lore tol=1e-4 (no base)", "lore", inputs,
                          lore_config_yaml(models, parameters={"tol": 1e-4}, dtype=dtype)))
    configs.append(Config("lore base_model tol=1e-4", "lore", inputs,
                          lore_config_yaml(models, base=base, parameters={"tol": 1e-4}, dtype=dtype)))
    return configs


def family_params(args: argparse.Namespace, count: int) -> Dict[str, object]:
    return dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, count=count,
                dtype=args.dtype, rank=args.ft_rank, strength=args.ft_strength,
                noise=args.ft_noise, shared=args.ft_shared, seed=args.seed)


def ensure_family(args: argparse.Namespace, count: int, log) -> Dict[str, object]:
    if args.model_dirs:  # existing checkpoints: BASE,MODEL,MODEL,...
        paths = [Path(p).resolve() for p in args.model_dirs.split(",")]
        if len(paths) < count + 1:
            raise SystemExit(f"--model-dirs needs a base and {count} models, got {len(paths)} paths")
        log(f"using existing models: base {paths[0]}, {len(paths) - 1} fine-tunes")
        return {"base": paths[0], "models": paths[1:]}
    root = Path(args.workdir) / "models"
    marker = root / "family.json"
    wanted = family_params(args, count)
    if marker.exists() and not args.rebuild:
        stored = json.loads(marker.read_text())
        have = dict(stored.get("params", {}))
        if have.pop("count", -1) >= count and have == {k: v for k, v in wanted.items() if k != "count"}:
            log(f"reusing models in {root}")
            return {"base": Path(stored["base"]), "models": [Path(p) for p in stored["models"]]}
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shape = TinyLlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                           heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)
    began = time.perf_counter()
    family = build_family(root, count, shape=shape, seed=args.seed, rank=args.ft_rank,
                          strength=args.ft_strength, noise=args.ft_noise, shared=args.ft_shared,
                          dtype=getattr(torch, args.dtype))
    log(f"built base + {count} variants in {time.perf_counter() - began:.0f} s")
    marker.write_text(json.dumps({"params": wanted, "base": str(family["base"]),
                                  "models": [str(p) for p in family["models"]]}, indent=2))
    return family


def describe_models(args: argparse.Namespace, family: Dict[str, object]) -> List[str]:
    """The header lines naming the models merged."""
    size = model_size(family["base"]) / 1e9
    if args.model_dirs:
        config = json.loads((Path(family["base"]) / "config.json").read_text())
        return [f"- models: existing checkpoints, base `{family['base']}`, fine-tunes "
                + ", ".join(f"`{p}`" for p in family["models"])
                + f"; {config.get('model_type')}, hidden {config.get('hidden_size')}, intermediate "
                f"{config.get('intermediate_size')}, {config.get('num_hidden_layers')} layers, vocab "
                f"{config.get('vocab_size')}; {size:.3f} GB per model"]
    return [
        f"- model: Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads ({args.kv_heads} kv), vocab {args.vocab}, untied embeddings: "
        f"{param_count(args) / 1e6:.0f}M parameters, {size:.2f} GB per model ({args.dtype})",
        f"- inputs" + (f" (family {args.family})" if args.family else "") + f": base + low-rank (rank "
        f"{args.ft_rank}, strength {args.ft_strength}, shared fraction {args.ft_shared}) + dense noise "
        f"({args.ft_noise}) per variant (`mergekit_lore.demo.fine_tune_like`)",
    ]


def model_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def param_count(args: argparse.Namespace) -> int:
    h, i, v, n = args.hidden, args.intermediate, args.vocab, args.layers
    kv = h * args.kv_heads // args.heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + n * per_layer + h


def run_cli(config_path: Path, out: Path, args: argparse.Namespace) -> subprocess.CompletedProcess:
    return run_mergekit_yaml(config_path, out, cuda=args.cuda, threads=args.threads,
                             timeout=args.timeout if args.timeout > 0 else None)


# --------------------------------------------------------------------------- in-process split


class Instrument:
    """Monkeypatches mergekit task classes and lore internals to accumulate time."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.depth = 0
        self.patches: List[tuple] = []
        self.solves: List[object] = []

    def add(self, key: str, value: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + value

    def _patch(self, owner, name: str, key: str, outermost: bool = False) -> None:
        # Classes: the attribute defined on that class itself; modules: the global.
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        instrument = self

        @functools.wraps(original)
        def wrapper(*a, **k):
            if outermost and instrument.depth:
                return original(*a, **k)
            if outermost:
                instrument.depth += 1
            began = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                if args_cuda[0]:
                    torch.cuda.synchronize()
                instrument.add(key, time.perf_counter() - began)
                if outermost:
                    instrument.depth -= 1

        setattr(owner, name, wrapper)
        self.patches.append((owner, name, original))

    def install(self) -> None:
        import mergekit.io.tasks as io_tasks
        import mergekit.merge  # noqa: F401  (imports the planner and every task module)
        import mergekit.merge_methods  # noqa: F401  (registers lore)
        import mergekit_lore.lore as lore_module
        import mergekit_lore.method as method_module
        import mergekit_lore.solver as solver_module
        import mergekit_lore.subspace as subspace_module
        from mergekit.graph import Task

        categories = {
            io_tasks.LoadTensor: "load",
            io_tasks.SaveTensor: "write",
            io_tasks.TensorWriterTask: "write",
            io_tasks.FinalizeModel: "write",
        }
        seen = set()
        stack = list(Task.__subclasses__())
        while stack:
            cls = stack.pop()
            stack.extend(cls.__subclasses__())
            if cls in seen or "execute" not in cls.__dict__:
                continue
            seen.add(cls)
            self._patch(cls, "execute", categories.get(cls, "merge"), outermost=True)
        self._patch(method_module.LoreMerge, "merge_group", "lore.merge_group")
        self._patch(solver_module, "svt", "lore.svt")
        self._patch(lore_module, "top_singular", "lore.thresholds")
        self._patch(subspace_module.ResidualProducts, "right", "lore.dense")
        self._patch(subspace_module.ResidualProducts, "left", "lore.dense")
        self._patch(subspace_module, "_small_fista", "lore.small")
        original_solve = lore_module.solve_lore
        instrument = self

        def solve_and_record(*a, **k):
            solution = original_solve(*a, **k)
            instrument.solves.append((solution.iterations, tuple(solution.backends), tuple(solution.ranks)))
            return solution

        lore_module.solve_lore = solve_and_record
        self.patches.append((lore_module, "solve_lore", original_solve))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self.patches):
            setattr(owner, name, original)
        self.patches.clear()


args_cuda = [False]


def run_in_process(config: Config, workdir: Path, args: argparse.Namespace,
                   profile_dir: Optional[Path]) -> Dict[str, object]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = workdir / "out-inprocess"  # workdir: this run's private scratch folder
    if out.exists():
        shutil.rmtree(out)
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(config.yaml))
    options = MergeOptions(cuda=args.cuda, quiet=True)
    instrument = Instrument()
    instrument.install()
    profiler = cProfile.Profile() if profile_dir is not None else None
    began = time.perf_counter()
    try:
        if profiler is not None:
            profiler.enable()
        run_merge(merge_config, str(out), options=options, config_source=config.yaml)
        if profiler is not None:
            profiler.disable()
    finally:
        total = time.perf_counter() - began
        instrument.uninstall()
    shutil.rmtree(out, ignore_errors=True)
    s = instrument.seconds
    split = {
        "total": total,
        "load": s.get("load", 0.0),
        "merge": s.get("merge", 0.0),
        "write": s.get("write", 0.0),
    }
    split["other"] = total - split["load"] - split["merge"] - split["write"]
    if config.method == "lore":
        split["lore.merge_group"] = s.get("lore.merge_group", 0.0)
        split["lore.svt"] = s.get("lore.svt", 0.0)
        split["lore.thresholds"] = s.get("lore.thresholds", 0.0)
        split["lore.dense"] = s.get("lore.dense", 0.0)
        split["lore.small"] = s.get("lore.small", 0.0)
    stats: Dict[str, object] = {}
    if instrument.solves:
        iterations = [it for it, _, _ in instrument.solves]
        backends = sorted({b for _, bs, _ in instrument.solves for b in bs})
        stats = {
            "matrices": len(iterations),
            "iterations_mean": sum(iterations) / len(iterations),
            "iterations_max": max(iterations),
            "backends": backends,
            "max_rank": max((max(r) if r else 0) for _, _, r in instrument.solves),
        }
    if profiler is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in f"{config.name}_{config.inputs}in")
        profiler.dump_stats(str(profile_dir / f"{slug}.prof"))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
        (profile_dir / f"{slug}.txt").write_text(text.getvalue())
        tottime = io.StringIO()
        pstats.Stats(profiler, stream=tottime).sort_stats("tottime").print_stats(20)
        (profile_dir / f"{slug}.tottime.txt").write_text(tottime.getvalue())
    return {"split": split, "stats": stats}


# --------------------------------------------------------------------------- report


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def wall_table(configs: Sequence[Config]) -> str:
    # references of the same input count, measured in the same run
    references = {(c.inputs, c.method): c for c in configs if c.method in ("linear", "ties")}
    lines = [
        "| inputs | config | median wall s | runs (s) | / ties | / linear |",
        "|---|---|---|---|---|---|",
    ]
    for c in configs:
        ties = references.get((c.inputs, "ties"))
        linear = references.get((c.inputs, "linear"))
        runs = ", ".join(f"{t:.1f}" for t in c.times) or c.failed
        if c.failed and c.times:
            runs += f" ({c.failed})"
        lines.append(
            f"| {c.inputs} | {c.name} | {fmt(c.median)} | {runs} | "
            f"{ratio(c.median, ties.median if ties else None)} | {ratio(c.median, linear.median if linear else None)} |"
        )
    return "\n".join(lines)


def split_table(configs: Sequence[Config]) -> str:
    lines = [
        "| inputs | config | in-process total s | load | merge (method) | lore dense SVT (fallback) | lore thresholds | lore matrix-free products | lore small solves | write | other | solver iterations mean/max | backends | max kept rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        if not c.split:
            continue
        s = c.split
        st = c.stats or {}
        iters = f"{st['iterations_mean']:.1f} / {st['iterations_max']}" if st else "-"
        lines.append(
            f"| {c.inputs} | {c.name} | {fmt(s['total'])} | {fmt(s['load'])} | {fmt(s['merge'])} | "
            f"{fmt(s.get('lore.svt'))} | {fmt(s.get('lore.thresholds'))} | {fmt(s.get('lore.dense'))} | "
            f"{fmt(s.get('lore.small'))} | {fmt(s['write'])} | {fmt(s['other'])} | "
            f"{iters} | {', '.join(st.get('backends', [])) or '-'} | {st.get('max_rank', '-')} |"
        )
    return "\n".join(lines)


def machine_info(args: argparse.Namespace) -> str:
    return common_machine_info(args.threads, "cuda" if args.cuda else None)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (Llama-2-7B has no GQA)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="storage dtype of the models and of the merge")
    parser.add_argument("--inputs", default="2,3", help="comma list of input counts")
    parser.add_argument("--runs", type=int, default=3, help="mergekit-yaml runs per config (median)")
    parser.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml (and run_merge)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in this process and in mergekit-yaml (OMP_NUM_THREADS, --num-threads)")
    parser.add_argument("--configs", default=None,
                        help="only configs whose name contains one of these comma-separated words")
    parser.add_argument("--ft-rank", type=int, default=8, help="rank of the planted fine-tune update")
    parser.add_argument("--ft-strength", type=float, default=0.5)
    parser.add_argument("--ft-noise", type=float, default=0.02)
    parser.add_argument("--ft-shared", type=float, default=0.0,
                        help="fraction of each update shared by all variants (task-vector cosine)")
    parser.add_argument("--model-dirs", default=None,
                        help="comma list BASE,MODEL,... of existing checkpoints to merge instead of building a "
                             "synthetic family (e.g. the quality benchmark's fine-tunes)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default=None,
                        help="a named input family (FAMILIES): sets --ft-*, --dtype and --intermediate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    parser.add_argument("--rebuild", action="store_true", help="rebuild the models even if cached")
    parser.add_argument("--timeout", type=float, default=1200.0, help="per mergekit-yaml run (s, 0 = none)")
    parser.add_argument("--single-run-above", type=float, default=120.0,
                        help="a config whose first run took longer than this (s) is not repeated")
    parser.add_argument("--no-split", action="store_true", help="skip the in-process time split")
    parser.add_argument("--profile", default=None, help="directory for cProfile output of in-process lore runs")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    for key, value in FAMILIES.get(args.family, {}).items():
        setattr(args, key, value)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.threads:
        torch.set_num_threads(args.threads)
    args_cuda[0] = bool(args.cuda)
    inputs = sorted({int(x) for x in args.inputs.split(",") if x.strip()})
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    began = time.perf_counter()
    family = ensure_family(args, max(inputs), log)
    header = [
        "# End-to-end merge benchmark (mergekit-yaml wall time)",
        "",
        machine_info(args),
        *describe_models(args, family),
        f"- merge dtype {args.dtype}; mergekit-yaml --quiet" + (" --cuda" if args.cuda else "")
        + (f" --num-threads {args.threads}" if args.threads else "")
        + f"; {args.runs} runs per config, interleaved; median reported",
        f"- command: `{' '.join(['bench/bench_e2e.py'] + (argv if argv is not None else sys.argv[1:]))}`",
    ]
    print("\n".join(header), flush=True)

    all_configs: List[Config] = []
    config_dir = workdir / "configs"
    config_dir.mkdir(exist_ok=True)
    # merge outputs go to a folder of this run's own: two runs sharing --workdir (e.g. one per
    # core) must not delete each other's outputs mid-write
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    wanted = [w.strip() for w in args.configs.split(",")] if args.configs else None
    for k in inputs:
        configs = make_configs(family, k, args.dtype)
        if wanted:
            configs = [c for c in configs if any(w in c.name for w in wanted)]
        paths = {}
        for c in configs:
            slug = "".join(ch if ch.isalnum() else "_" for ch in c.name)
            paths[c.name] = config_dir / f"{slug}_{k}in.yml"
            paths[c.name].write_text(c.yaml)
        for run in range(args.runs):
            for c in configs:
                if c.failed:
                    continue
                if c.times and c.times[0] > args.single_run_above:
                    continue  # slow config: one run only (see --single-run-above)
                out = scratch / "out"
                if out.exists():
                    shutil.rmtree(out)
                t0 = time.perf_counter()
                try:
                    result = run_cli(paths[c.name], out, args)
                except subprocess.TimeoutExpired:
                    c.failed = f">{args.timeout:g} s timeout"
                    log(f"  {k} inputs | {c.name}: timeout after {args.timeout:g} s")
                    continue
                seconds = time.perf_counter() - t0
                if result.returncode != 0:
                    c.failed = f"exit {result.returncode}"
                    log(f"  {k} inputs | {c.name}: FAILED\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
                    continue
                c.times.append(seconds)
                log(f"  {k} inputs | run {run + 1}/{args.runs} | {c.name}: {seconds:.1f} s")
        shutil.rmtree(scratch / "out", ignore_errors=True)
        if not args.no_split:
            for c in configs:
                if c.failed:  # nothing to split (a config that failed in mergekit-yaml fails here too)
                    continue
                if c.method == "lore" and c.name not in ("lore default (no base; fista, auto)", "lore base_model (anchor)") \
                        and c.median is not None and c.median > 600:
                    continue  # a slow variant is not repeated in-process
                profile_dir = Path(args.profile) if (args.profile and c.method == "lore") else None
                measured = run_in_process(c, scratch, args, profile_dir)
                c.split, c.stats = measured["split"], measured["stats"]
                log(f"  {k} inputs | in-process {c.name}: " + ", ".join(f"{key} {v:.1f}" for key, v in c.split.items())
                    + (f" | {c.stats}" if c.stats else ""))
        all_configs.extend(configs)
    shutil.rmtree(scratch, ignore_errors=True)

    body = [
        "",
        "## mergekit-yaml wall time (subprocess, includes interpreter start-up and imports)",
        "",
        wall_table(all_configs),
    ]
    if not args.no_split:
        body += [
            "",
            "## Where the time goes (one in-process `run_merge` per config, instrumented)",
            "",
            "load = `LoadTensor.execute`; merge = the merge method's graph tasks; write = `SaveTensor` + "
            "`TensorWriterTask` + `FinalizeModel`; other = the rest of `run_merge` (architecture lookup, planning, "
            "config and tokenizer files). Parts of merge for lore: dense SVT = `svt` calls of the dense (fallback) "
            "solver, thresholds = `top_singular` for `mu_ratio`, matrix-free products = `ResidualProducts` passes of "
            "the subspace solve, small solves = its restricted FISTA (and the same FISTA on whole small matrices, "
            "backend `whole`); the rest of merge is thin QRs, convergence "
            "checks, the anchored mean, finite checks and the combine. Iterations (outer steps)/backends/ranks are "
            "per solved matrix, from `solve_lore`.",
            "",
            split_table(all_configs),
        ]
    body += ["", f"Total benchmark wall time {time.perf_counter() - began:.0f} s; load average at end "
             f"{os.getloadavg()[0]:.1f}."]
    print("\n".join(body), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(header + body) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
