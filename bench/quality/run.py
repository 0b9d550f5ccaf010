"""Real-data merge-quality benchmark for mergekit's ``lore`` method (CPU, one command).

    python bench/quality/run.py [--domain NAME=GLOB ...] [--workdir DIR] [--out DIR]

1. Reads the domains, splits each deterministically into train/val/test, trains a
   byte-level BPE tokenizer on the train split.
2. Pre-trains a small Llama (``LlamaForCausalLM``) on the domain mixture, keeping the
   last checkpoints (scenario ``ckpt``), then fine-tunes one copy per domain
   (scenario ``task``; the first two fine-tunes form scenario ``pair``).
3. Runs every merge through the real ``mergekit-yaml`` CLI and scores held-out loss.
4. Writes ``results.md``, ``results.json`` and ``quality.png`` to ``--out``.

Trained models are cached under ``--workdir`` (keyed by data, shape and schedule);
merges always run again. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.quality import data as qdata  # noqa: E402
from bench.quality import merges as qmerges  # noqa: E402
from bench.quality import report as qreport  # noqa: E402
from bench.quality import train as qtrain  # noqa: E402

PRESETS = {
    "full": dict(
        shape=qtrain.Shape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=1024, seq_len=128),
        pretrain=qtrain.Schedule(steps=700, lr=3e-3, warmup=30, batch=16),
        finetune=qtrain.Schedule(steps=100, lr=1e-3, warmup=10, batch=16),
        ckpt_every=25,
        ckpt_count=4,
        max_chars=1_500_000,
        chunk_chars=4000,
        eval_val=16,
        eval_test=32,
        merges="full",
    ),
    "tiny": dict(
        shape=qtrain.Shape(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=300, seq_len=32),
        pretrain=qtrain.Schedule(steps=10, lr=3e-3, warmup=2, batch=4),
        finetune=qtrain.Schedule(steps=4, lr=3e-3, warmup=1, batch=4),
        ckpt_every=2,
        ckpt_count=2,
        max_chars=20_000,
        chunk_chars=200,
        eval_val=4,
        eval_test=4,
        merges="tiny",
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", action="append", metavar="NAME=GLOB",
                        help="a domain (repeat); GLOB may start with 'strings:'; {stdlib} expands. "
                             "Default: " + " ".join(qdata.DEFAULT_DOMAINS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-lore-quality"),
                        help="cache for data, tokenizer and trained models (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="where results.md/json and quality.png go (default: bench/quality/results)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for training, scoring and each mergekit-yaml run (default 1: on a "
                             "shared 2-core machine OpenMP's spin-waiting makes 2 threads up to 100x slower "
                             "for the small matrices here)")
    parser.add_argument("--only", default="", help="comma-separated scenarios to merge (task,ckpt,pair)")
    parser.add_argument("--keep-merges", action="store_true", help="keep merged model folders")
    parser.add_argument("--regime", choices=("heavy", "skills", "skills-lora", "replay"), default=None,
                        help="run one fine-tuning regime over --seeds (writes regime-NAME.{md,json,png}); "
                             "without it, the original task/ckpt/pair scenarios")
    parser.add_argument("--seeds", default="0,1", help="training seeds of --regime (default: %(default)s)")
    parser.add_argument("--no-recovery", action="store_true", help="skip the base-recovery solves of --regime")
    parser.add_argument("--train-only", action="store_true",
                        help="with --regime: only fine-tune and cache its models for --seeds (what recheck.py needs)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_models(args, preset, corpus, eos_id: int) -> Dict[str, object]:
    """Pre-train (with checkpoints) and fine-tune, reusing cached models."""
    shape, pre, ft = preset["shape"], preset["pretrain"], preset["finetune"]
    root = args.workdir / "models"
    every, count = preset["ckpt_every"], preset["ckpt_count"]
    ckpt_steps = [pre.steps - every * i for i in range(count, -1, -1)]  # anchor + count checkpoints
    if ckpt_steps[0] <= 0:
        raise ValueError("pre-training too short for the checkpoint window")
    pre_key = qtrain.cache_key("pre", shape, pre, args.seed, corpus.tokenizer.name, ckpt_steps)
    ckpt_paths = {s: (root / f"pretrain_step{s}").resolve() for s in ckpt_steps}
    timings: Dict[str, float] = {}
    if all(qtrain.cached(p, pre_key) for p in ckpt_paths.values()):
        log("pre-training: cached")
    else:
        log(f"pre-training {pre.steps} steps on the mixture of {', '.join(corpus.names)}")
        model = qtrain.new_model(shape, eos_id, args.seed)

        def save(step, model):
            if step in ckpt_paths:
                qtrain.save_model(model, ckpt_paths[step], corpus.tokenizer, {"key": pre_key, "step": step})

        timings["pretrain_s"] = qtrain.train(model, corpus.blocks["train"], pre, args.seed, on_step=save,
                                            log=log, label="pretrain")["seconds"]
    base = ckpt_paths[pre.steps]
    finetunes = {}
    for index, name in enumerate(corpus.names):
        path = (root / f"finetune_{name}").resolve()
        key = qtrain.cache_key("ft", pre_key, ft, args.seed + 1 + index, name)
        finetunes[name] = path
        if qtrain.cached(path, key):
            log(f"fine-tune {name}: cached")
            continue
        log(f"fine-tuning on {name} for {ft.steps} steps")
        model = qtrain.load_model(base)
        seconds = qtrain.train(model, {name: corpus.blocks["train"][name]}, ft, args.seed + 1 + index,
                               log=log, label=f"ft-{name}")["seconds"]
        timings[f"finetune_{name}_s"] = seconds
        qtrain.save_model(model, path, corpus.tokenizer, {"key": key})
    return {"base": base, "pre_key": pre_key, "ckpts": ckpt_paths, "ckpt_steps": ckpt_steps, "finetunes": finetunes,
            "timings": timings}


def score(model_dir: Path, eval_sets) -> Dict[str, Dict[str, float]]:
    model = qtrain.load_model(model_dir)
    return {split: qtrain.evaluate(model, blocks) for split, blocks in eval_sets.items()}


def with_means(record: Dict[str, object], domains: List[str]) -> Dict[str, object]:
    for split in ("val", "test"):
        losses = record.get(split)
        if losses:
            record[f"{split}_mean"] = sum(losses[d] for d in domains) / len(domains)
    record["domains"] = list(domains)
    return record


@contextlib.contextmanager
def thread_limits(threads: int):
    """Run with ``threads`` torch threads; subprocesses inherit the same limit."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_threads = torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    with thread_limits(max(1, args.threads)):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv) -> Dict[str, object]:
    preset = PRESETS[args.preset]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    began = time.perf_counter()
    load_start = list(os.getloadavg())
    args.workdir = args.workdir.resolve()
    args.out = args.out.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    domains = [qdata.Domain.parse(s) for s in (args.domain or qdata.DEFAULT_DOMAINS)]
    if len(domains) < 2:
        raise SystemExit("need at least two domains")
    log("preparing data: " + ", ".join(f"{d.name}={d.pattern}" for d in domains))
    shape = preset["shape"]
    corpus = qdata.prepare(domains, args.workdir / "data", vocab_size=shape.vocab, seq_len=shape.seq_len,
                           max_chars=preset["max_chars"], chunk_chars=preset["chunk_chars"])
    from transformers import PreTrainedTokenizerFast

    eos_id = PreTrainedTokenizerFast.from_pretrained(str(corpus.tokenizer)).convert_tokens_to_ids(qdata.EOS)
    eval_sets = {
        "val": {d: corpus.blocks["val"][d][: preset["eval_val"]] for d in corpus.names},
        "test": {d: corpus.blocks["test"][d][: preset["eval_test"]] for d in corpus.names},
    }
    prep_s = time.perf_counter() - began

    models = ensure_models(args, preset, corpus, eos_id)
    if args.regime:
        from bench.quality import regime_run

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(corpus.tokenizer))
        texts = qdata.domain_texts(domains, preset["max_chars"], preset["chunk_chars"])
        return regime_run.main(args, preset, {"corpus": corpus, "texts": texts, "tokenizer": tokenizer,
                                              "models": models}, log)
    train_s = time.perf_counter() - began - prep_s
    names = corpus.names
    base = models["base"]
    ckpt_steps = models["ckpt_steps"]
    ckpt_anchor = models["ckpts"][ckpt_steps[0]]
    ckpt_models = [models["ckpts"][s] for s in ckpt_steps[1:]]
    finetunes = [models["finetunes"][d] for d in names]
    pair_domains = names[:2]
    scenario_domains = {"task": names, "ckpt": names, "pair": pair_domains}

    # ---------------------------------------------------------------- references
    log("scoring the un-merged models")
    records: List[Dict[str, object]] = []
    scores = {}
    for label, path in [("base", base)] + [(f"finetune {d}", models["finetunes"][d]) for d in names] + [
        (f"checkpoint step {s}", models["ckpts"][s]) for s in ckpt_steps[:-1]
    ]:
        scores[label] = score(path, eval_sets)
    scores["checkpoint step %d" % ckpt_steps[-1]] = scores["base"]
    for scenario, labels in {
        "task": ["base"] + [f"finetune {d}" for d in names],
        "ckpt": [f"checkpoint step {s}" for s in ckpt_steps],
        "pair": ["base"] + [f"finetune {d}" for d in pair_domains],
    }.items():
        for label in labels:
            role = label
            if scenario == "ckpt" and label == f"checkpoint step {ckpt_steps[0]}":
                role += " (merge base)"
            if scenario == "ckpt" and label == f"checkpoint step {ckpt_steps[-1]}":
                role += " (last)"
            records.append(with_means({"scenario": scenario, "name": role, "group": "reference",
                                       "method": "-", "seconds": None, **scores[label]},
                                      scenario_domains[scenario]))

    log("measuring divergence")
    base_state = qtrain.state_of(qtrain.load_model(base))
    divergence = {
        "task": qtrain.divergence(base_state, {d: qtrain.state_of(qtrain.load_model(models["finetunes"][d]))
                                               for d in names}),
        "ckpt": qtrain.divergence(
            qtrain.state_of(qtrain.load_model(ckpt_anchor)),
            {f"step{s}": qtrain.state_of(qtrain.load_model(models["ckpts"][s])) for s in ckpt_steps[1:]}),
    }

    # ---------------------------------------------------------------- merges
    if preset["merges"] == "tiny":
        plan = qmerges.tiny_rows("task", finetunes, base)
    else:
        plan = (qmerges.baselines("task", finetunes, base) + qmerges.lore_rows("task", finetunes, base)
                + qmerges.baselines("ckpt", ckpt_models, ckpt_anchor)
                + qmerges.lore_rows("ckpt", ckpt_models, ckpt_anchor)
                + qmerges.pair_rows(finetunes[:2], base))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only:
        plan = [m for m in plan if m.scenario in only]
    log(f"running {len(plan)} merges through mergekit-yaml")
    merge_root = args.workdir / "merges"
    for index, merge in enumerate(plan, 1):
        outcome = merge.run(merge_root / merge.scenario)
        record = {"scenario": merge.scenario, "name": merge.name, "group": merge.group,
                  "method": merge.method, "tags": merge.tags, "seed": merge.seed,
                  "seconds": outcome["seconds"], "returncode": outcome["returncode"],
                  "config": outcome["config"]}
        if outcome["returncode"] == 0:
            record.update(score(outcome["out"], eval_sets))
            with_means(record, scenario_domains[merge.scenario])
            if not args.keep_merges:
                shutil.rmtree(outcome["out"], ignore_errors=True)
        else:
            record["error"] = outcome["stderr_tail"]
            record["domains"] = scenario_domains[merge.scenario]
        if outcome["warnings"]:
            record["warnings"] = outcome["warnings"]
        records.append(record)
        status = (f"test {record['test_mean']:.4f} val {record['val_mean']:.4f}"
                  if "test_mean" in record else f"FAILED rc={outcome['returncode']}")
        log(f"  [{index}/{len(plan)}] {merge.scenario}: {merge.name}: {status} ({outcome['seconds']:.1f} s)")

    total_s = time.perf_counter() - began
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "run.py"]
                            + (list(argv) if argv is not None else sys.argv[1:])),
        "preset": args.preset,
        "seed": args.seed,
        "shape": asdict(shape),
        "pretrain": asdict(preset["pretrain"]),
        "finetune": asdict(preset["finetune"]),
        "ckpt_steps": ckpt_steps,
        "domains": corpus.stats,
        "domain_names": names,
        "pair_domains": pair_domains,
        "eval_blocks": {"val": preset["eval_val"], "test": preset["eval_test"], "seq_len": shape.seq_len},
        "divergence": divergence,
        "timings": {"prepare_s": prep_s, "train_s": train_s, "total_s": total_s, **models["timings"]},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
        "records": records,
    }
    result["analysis"] = qreport.analyse(result)
    qreport.write(result, args.out)
    log(f"done in {total_s / 60:.1f} min; results in {args.out}")
    return result


if __name__ == "__main__":
    main()
