"""merge-adapters vs PEFT's add_weighted_adapter vs dense lore: speed, memory, quality.

    python bench/bench_adapters.py speed   [--adapters 3 8] [--layers 2] [--workdir DIR]
    python bench/bench_adapters.py quality [--seeds 0 1 2] [--workdir DIR]

``speed``: a synthetic base with ``--layers`` decoder layers of Llama-7B shape (hidden 4096,
intermediate 11008, nothing downloaded), n random rank-16 LoRA adapters on q_proj and v_proj
(PEFT's default Llama targets; B non-zero). Every method runs in its own subprocess and
reports wall time, peak RSS above the process's RSS before the timed call (what the merge
itself allocates) and the process's whole peak RSS (inputs, base model and libraries included):
- ``core``: ``merge_adapters`` (reads the adapters, solves in core space, writes one adapter;
  exact, and capped at the output rank r with ``--rank``);
- PEFT ``add_weighted_adapter`` (linear, cat, svd, ties_svd, dare_ties_svd at ``svd_rank`` r,
  density 0.5) on a PeftModel holding the base and the n adapters (loading not timed);
- ``dense``: ``lore_merge`` on the merged-in dense weights ``W + B_i A_i`` (forming them is
  not timed), the same parameters; its result is compared with the core-space adapter.

``quality``: held-out loss of merged LoRA fine-tunes, see ``bench/bench_adapters_quality.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RANK = 16
TARGETS = ["q_proj", "v_proj"]
PEFT_METHODS = ["linear", "cat", "svd", "ties_svd", "dare_ties_svd"]


class PeakRss:
    """Samples this process's resident set every 5 ms; ``peak`` is the most seen above the start."""

    def __init__(self):
        self.start = self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.start = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.start)


def build_speed_inputs(workdir: Path, layers: int, count: int):
    """The base (bf16 safetensors) and ``count`` adapters, cached under ``workdir``."""
    import peft
    import transformers

    base = workdir / f"base_l{layers}"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                          num_attention_heads=32, num_key_value_heads=32, vocab_size=256)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(base)
        del model
    adapters = []
    for index in range(count):
        path = workdir / f"adapter_l{layers}_{index}"
        adapters.append(path)
        if (path / "adapter_config.json").exists():
            continue
        torch.manual_seed(100 + index)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        lora = peft.LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        model = peft.get_peft_model(model, lora)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data = torch.randn_like(parameter.data, dtype=torch.float32) * 0.01
            elif "lora_A" in name:
                parameter.data = parameter.data.float()
        model.save_pretrained(path)
        del model
    return base, adapters


def run_core(base, adapters, out, rank):
    from mergekit_lore.adapters import merge_adapters

    with PeakRss() as memory:
        began = time.perf_counter()
        result = merge_adapters(base, adapters, out, rank=rank, force=True)
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_bytes": memory.peak, "rss_before_bytes": memory.start, "max_rank": max(m.rank for m in result.modules.values()),
            "max_truncation_error": result.max_truncation_error}


def run_peft(base, adapters, method):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    names = [f"a{i}" for i in range(len(adapters))]
    options = {} if method in ("linear", "cat") else {"svd_rank": RANK}
    if "ties" in method:
        options["density"] = 0.5
    with PeakRss() as memory:
        began = time.perf_counter()
        model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=method, **options)
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_bytes": memory.peak, "rss_before_bytes": memory.start}


def run_dense(base, adapters, core_out):
    """Dense lore on W + B_i A_i per module; compares with the core-space adapter in ``core_out``."""
    from safetensors import safe_open

    from mergekit_lore.adapters import adapter_parameters
    from mergekit_lore.adapters_io import read_adapter
    from mergekit_lore.params import lore_config
    from mergekit_lore.lore import lore_merge

    loaded = [read_adapter(p) for p in adapters]
    merged = read_adapter(core_out)
    config = lore_config(adapter_parameters(len(loaded))[0], list(range(len(loaded))))
    handle = safe_open(str(next(Path(base).glob("*.safetensors"))), framework="pt")
    seconds, peak, errors, before = 0.0, 0, [], 0
    for module in sorted(loaded[0].modules):
        weight = handle.get_tensor(f"{module}.weight").float()
        thetas = [torch.addmm(weight, a.modules[module].b.float(), a.modules[module].a.float()) for a in loaded]
        with PeakRss() as memory:
            began = time.perf_counter()
            out = lore_merge(thetas, config, base=weight, trim=None, sign_consensus=None)
            seconds += time.perf_counter() - began
        peak, before = max(peak, memory.peak), max(before, memory.start)
        update = (out - weight).double()
        core = merged.modules[module].b @ merged.modules[module].a
        errors.append(float((core - update).norm() / update.norm()))
        del thetas, out
    return {"seconds": seconds, "peak_bytes": peak, "rss_before_bytes": before,
            "max_relative_difference_to_core": max(errors)}


def speed_child(args) -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    base, adapters = build_speed_inputs(args.workdir, args.layers, args.count)
    out = args.workdir / f"core_out_l{args.layers}_n{args.count}"
    if args.method == "core":
        result = run_core(base, adapters, out, None)
    elif args.method == "core_rank":
        result = run_core(base, adapters, Path(str(out) + "_r"), RANK)
    elif args.method == "dense":
        result = run_dense(base, adapters, out)
    else:
        result = run_peft(base, adapters, args.method)
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as handle:
        hwm = next(line for line in handle if line.startswith("VmHWM:"))
    result["process_max_rss_bytes"] = int(hwm.split()[1]) * 1024
    print("RESULT " + json.dumps(result))


def speed_main(args) -> None:
    rows = []
    methods = args.methods or ["core", "core_rank", "dense"] + PEFT_METHODS
    for count in args.adapters:
        build_speed_inputs(args.workdir, args.layers, count)
        for method in methods:
            command = [sys.executable, __file__, "_speed_child", "--method", method, "--count", str(count),
                       "--layers", str(args.layers), "--workdir", str(args.workdir)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method} n={count} failed")
            row = {"n": count, "method": method, **json.loads(line[-1][7:])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.workdir.joinpath(args.save).write_text(json.dumps(rows, indent=1))
    print(speed_table(rows))


def _process_peak(row, memory_rows) -> str:
    """The process's peak RSS (VmHWM). Rows of runs that recorded no reliable one take it from the
    memory pass; PEFT's svd variants load like ``linear``: resident-before(linear) + merge peak (~)."""
    if "rss_before_bytes" in row:
        return f"{row['process_max_rss_bytes'] / 2**20:.0f}"
    same = [m for m in memory_rows if m["n"] == row["n"] and m["method"] == row["method"]]
    if same:
        return f"{same[0]['process_max_rss_bytes'] / 2**20:.0f}"
    like = [m for m in memory_rows if m["n"] == row["n"] and m["method"] == "linear"]
    if like and row["method"] in PEFT_METHODS:
        return f"~{(like[0]['rss_before_bytes'] + row['peak_bytes']) / 2**20:.0f}"
    return "n/a"


def speed_table(rows, memory_rows=()) -> str:
    lines = ["| n | method | seconds | x core time | merge peak MiB | process peak MiB | notes |",
             "|---|---|---|---|---|---|---|"]
    for count in sorted({r["n"] for r in rows}):
        core = next(r for r in rows if r["n"] == count and r["method"] == "core")
        for row in (r for r in rows if r["n"] == count):
            notes = []
            if "max_rank" in row:
                notes.append(f"max rank {row['max_rank']}, trunc. err {row['max_truncation_error']:.3g}")
            if "max_relative_difference_to_core" in row:
                notes.append(f"max rel. diff. to core {row['max_relative_difference_to_core']:.2g}")
            name = {"core": "lore core space (exact)", "core_rank": f"lore core space --rank {RANK}",
                    "dense": "lore dense (lore_merge on W + B_i A_i)"}.get(row["method"], f"PEFT {row['method']}")
            lines.append(f"| {count} | {name} | {row['seconds']:.2f} | {row['seconds'] / core['seconds']:.1f} | "
                         f"{row['peak_bytes'] / 2**20:.0f} | {_process_peak(row, memory_rows)} | "
                         f"{'; '.join(notes)} |")
    return "\n".join(lines)


def table_main(args) -> None:
    rows = json.loads(args.json.read_text())
    memory = json.loads(args.memory.read_text()) if args.memory else []
    print(speed_table(rows, memory))
    if args.plot:
        plot_speed(rows, args.plot)


def plot_speed(rows, path: Path) -> None:
    """Bar chart of merge seconds (log scale) per method, one group per n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    counts = sorted({r["n"] for r in rows})
    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(counts)
    for offset, count in enumerate(counts):
        values = [next(r["seconds"] for r in rows if r["n"] == count and r["method"] == m) for m in methods]
        axis.bar([i + offset * width for i in range(len(methods))], values, width, label=f"{count} adapters")
    axis.set_yscale("log")
    axis.set_xticks([i + width * (len(counts) - 1) / 2 for i in range(len(methods))])
    axis.set_xticklabels([m.replace("_rank", f" r{RANK}") for m in methods], rotation=25, ha="right")
    axis.set_ylabel("merge seconds (log)")
    axis.set_title("rank-16 LoRA adapters, 2 layers of Llama-7B shape (q,v), 1 CPU thread")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--adapters", type=int, nargs="+", default=[3, 8])
    speed.add_argument("--layers", type=int, default=2)
    speed.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all)")
    speed.add_argument("--save", default="speed.json", help="file name of the rows under --workdir")
    speed.add_argument("--workdir", type=Path, default=Path("/tmp/bench-adapters"))
    child = sub.add_parser("_speed_child")
    for name, kind in (("--method", str), ("--count", int), ("--layers", int), ("--workdir", Path)):
        child.add_argument(name, type=kind, required=True)
    table = sub.add_parser("table", help="print the speed table of a speed.json")
    table.add_argument("json", type=Path)
    table.add_argument("--memory", type=Path, default=None,
                       help="rows of a second run (--methods core core_rank dense linear cat) for resident RSS")
    table.add_argument("--plot", type=Path, default=None, help="also write a bar chart (PNG)")
    quality = sub.add_parser("quality")
    quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    quality.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-lore-quality"))
    quality.add_argument("--out", type=Path, default=Path("/tmp/bench-adapters/quality.json"))
    args = parser.parse_args()
    if args.command == "speed":
        args.workdir.mkdir(parents=True, exist_ok=True)
        speed_main(args)
    elif args.command == "_speed_child":
        speed_child(args)
    elif args.command == "table":
        table_main(args)
    else:
        from bench.bench_adapters_quality import quality_main

        quality_main(args)


if __name__ == "__main__":
    main()
