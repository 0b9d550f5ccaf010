"""One regime of the quality benchmark (``run.py --regime NAME``), over training seeds.

Per seed: fine-tune one model per task from the shared base (cached), score the base and
the fine-tunes, measure divergence, run the baselines and the default ``lore`` rows
through ``mergekit-yaml``, then a ``lore`` grid (mu_ratio x lambda, with and without the
base) solved in this process (``inproc.py``), and, for the first seed, base recovery.
Choices are made on val and reported on test (``regime_report.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict
import shutil
import time
from pathlib import Path
from typing import Dict, List

import torch

from bench.quality import inproc
from bench.quality import merges as qmerges
from bench.quality import regime_report
from bench.quality import regimes as qregimes
from bench.quality import train as qtrain
from mergekit_lore.demo import load_weights

GRID_MU = (0.05, 0.1, 0.2, 0.4)
GRID_LAMBDA = (0.3, 0.5, 0.7, 1.0, 1.5)
RECOVERY_MU = (0.05, 0.2, 0.5)
GRID_MODES = ("none", "anchor", "fixed")  # no base; base_mode anchor (base_weight 1); base_mode fixed
RECOVERY_SOLVERS = ("fista", "cd")


class Scorer:
    """Held-out loss of a model folder or a state dict, on val and test (tasks + general)."""

    def __init__(self, base: Path, eval_sets: Dict[str, Dict[str, torch.Tensor]], tasks: List[str]):
        self.model = qtrain.load_model(base)
        self.eval_sets = eval_sets
        self.tasks = tasks

    def state(self, state: Dict[str, torch.Tensor]) -> Dict[str, object]:
        self.model.load_state_dict(state, strict=True)
        out: Dict[str, object] = {}
        for split, blocks in self.eval_sets.items():
            losses = qtrain.evaluate(self.model, blocks)
            out[split] = losses
            out[f"{split}_mean"] = sum(losses[t] for t in self.tasks) / len(self.tasks)
            general = [v for k, v in losses.items() if k.startswith("general:")]
            out[f"{split}_general"] = sum(general) / len(general) if general else None
        return out

    def folder(self, path: Path) -> Dict[str, object]:
        return self.state(load_weights(path))


def _eval_sets(data, corpus, preset, general: bool) -> Dict[str, Dict[str, torch.Tensor]]:
    """Task blocks, plus the plain domains as ``general:NAME`` when the tasks are skills."""
    out = {}
    for split, count in (("val", preset["eval_val"]), ("test", preset["eval_test"])):
        sets = {t: b[:count] for t, b in data[split].items()}
        if general:
            sets.update({f"general:{d}": b[:count] for d, b in corpus.blocks[split].items()})
        out[split] = sets
    return out


def _mergekit_rows(seed, paths, base, scorer, workdir, plan_fn, log) -> List[dict]:
    rows = []
    plan = plan_fn(f"seed{seed}", [paths[t] for t in paths], base)
    for index, merge in enumerate(plan, 1):
        outcome = merge.run(workdir / "merges" / f"seed{seed}", in_process=True)
        row = {"seed": seed, "name": merge.name, "group": merge.group, "method": merge.method,
               "tags": merge.tags, "seconds": outcome["seconds"], "returncode": outcome["returncode"],
               "via": "mergekit run_merge"}
        if outcome["returncode"] == 0:
            row.update(scorer.folder(outcome["out"]))
            shutil.rmtree(outcome["out"], ignore_errors=True)
        else:
            row["error"] = outcome["stderr_tail"]
        rows.append(row)
        status = f"test {row['test_mean']:.4f}" if "test_mean" in row else f"FAILED rc={outcome['returncode']}"
        log(f"  [{index}/{len(plan)}] seed {seed} {merge.name}: {status} ({outcome['seconds']:.1f} s)")
    return rows


def _grid_rows(seed, states, base_state, scorer, log, grid_mu=GRID_MU, grid_lambda=GRID_LAMBDA) -> List[dict]:
    rows = []
    for mode in GRID_MODES:
        has_base = mode != "none"
        for ratio in grid_mu:
            began = time.perf_counter()
            sols = inproc.solve_all(states, base_state if has_base else None, ratio, fix_base=mode == "fixed")
            solve_s = time.perf_counter() - began
            for lam in grid_lambda:
                label = {"none": "no base", "anchor": "base", "fixed": "base fixed"}[mode]
                row = {"seed": seed, "group": "grid", "method": "lore", "via": "in-process",
                       "name": f"lore {label} mu_ratio={ratio:g} lambda={lam:g}",
                       "tags": {"family": "lore", "has_base": has_base, "base_mode": mode, "mu_ratio": ratio,
                                "lambda": lam}, "seconds": solve_s}
                row.update(scorer.state(inproc.combine(sols, lam)))
                rows.append(row)
            log(f"  grid seed {seed} base={mode} mu_ratio={ratio:g}: solve {solve_s:.1f} s; test "
                + " ".join(f"{r['tags']['lambda']:g}:{r['test_mean']:.4f}" for r in rows[-len(grid_lambda):]))
    return rows


def _recovery(states, base_state, log, mus=RECOVERY_MU) -> List[dict]:
    out = []
    for n in range(2, len(states) + 1):
        for solver in RECOVERY_SOLVERS:
            for ratio in mus:
                began = time.perf_counter()
                sols = inproc.solve_all(states[:n], None, ratio, solver=solver)
                entry = {"n": n, "solver": solver, "mu_ratio": ratio, "seconds": time.perf_counter() - began,
                         **inproc.base_recovery(sols, states[:n], base_state)}
                out.append(entry)
                log(f"  recovery n={n} {solver} mu_ratio={ratio:g}: {entry['ratio']:.4f} ({entry['seconds']:.1f} s)")
    return out


def _regime_data(args, preset, setup):
    """The regime, its task data (train restricted to its tasks) and its task names."""
    tiny = args.preset == "tiny"
    regime = (qregimes.TINY if tiny else qregimes.REGIMES)[args.regime]
    limits = {"val": preset["eval_val"], "test": preset["eval_test"], "train": 64 if tiny else 0}
    data = qregimes.task_data(regime, setup["corpus"], setup["texts"], setup["tokenizer"],
                              preset["shape"].seq_len, limits)
    tasks = qregimes.task_names(regime, setup["corpus"].names)
    data["train"] = {t: data["train"][t] for t in tasks}
    return regime, data, tasks


def run_seed(regime, seed, context, log) -> Dict[str, object]:
    c = context
    paths, timings = qregimes.ensure_finetunes(regime, seed, c["base"], c["pre_key"], c["data"]["train"],
                                               c["corpus"].blocks["train"], c["corpus"].tokenizer,
                                               c["workdir"] / "models", log)
    scorer = c["scorer"]
    refs = [{"seed": seed, "name": "base", "group": "reference", **scorer.folder(c["base"])}]
    refs += [{"seed": seed, "name": f"finetune {t}", "group": "reference", "task": t, **scorer.folder(p)}
             for t, p in paths.items()]
    base_state = load_weights(c["base"])
    states = [load_weights(p) for p in paths.values()]
    divergence = qtrain.divergence({k: v.float() for k, v in base_state.items()},
                                   {t: {k: v.float() for k, v in s.items()} for t, s in zip(paths, states)})
    rows = _mergekit_rows(seed, paths, c["base"], scorer, c["workdir"], c["plan"], log)
    if c["grid"]:
        rows += _grid_rows(seed, states, base_state, scorer, log, *c["grid"])
    recovery = _recovery(states, base_state, log, c["recovery_mu"]) if c["recovery"] else []
    return {"seed": seed, "records": refs + rows, "divergence": divergence, "recovery": recovery,
            "timings": timings}


def main(args, preset, setup, log) -> Dict[str, object]:
    """``setup`` (from run.py): corpus, texts, tokenizer, models (base, pre_key)."""
    tiny = args.preset == "tiny"
    began = time.perf_counter()
    load_start = list(os.getloadavg())
    regime, data, tasks = _regime_data(args, preset, setup)
    if getattr(args, "train_only", False):  # fine-tune and cache the models (e.g. for recheck.py), nothing else
        for seed in (int(s) for s in args.seeds.split(",")):
            qregimes.ensure_finetunes(regime, seed, setup["models"]["base"], setup["models"]["pre_key"],
                                      data["train"], setup["corpus"].blocks["train"], setup["corpus"].tokenizer,
                                      args.workdir / "models", log)
        log(f"regime {regime.name}: models for seeds {args.seeds} cached in {args.workdir / 'models'}")
        return {"regime": regime.name, "seeds": args.seeds, "train_only": True}
    eval_sets = _eval_sets(data, setup["corpus"], preset, regime.kind == "skills")
    context = {"base": setup["models"]["base"], "pre_key": setup["models"]["pre_key"], "data": data,
               "corpus": setup["corpus"], "workdir": args.workdir, "scorer": Scorer(setup["models"]["base"],
                                                                                    eval_sets, tasks),
               "plan": qmerges.tiny_regime_rows if tiny else qmerges.regime_baselines,
               "grid": ((0.2,), (0.5, 1.0)) if tiny else (GRID_MU, GRID_LAMBDA),
               "recovery": True, "recovery_mu": (0.2,) if tiny else RECOVERY_MU}
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    for index, seed in enumerate(seeds):
        context["recovery"] = index == 0 and not args.no_recovery
        per_seed.append(run_seed(regime, seed, context, log))
    result = {"regime": regime.name, "description": regime.description, "preset": args.preset,
              "seeds": seeds, "tasks": tasks, "general": list(setup["corpus"].names),
              "finetune": asdict(regime.finetune),
              "replay": regime.replay, "lora_rank": regime.lora_rank, "per_seed": per_seed,
              "eval_blocks": {"val": preset["eval_val"], "test": preset["eval_test"], "seq_len": preset["shape"].seq_len},
              "lore_defaults": dict(qmerges.LORE_DEFAULTS),
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                          "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
              "total_s": time.perf_counter() - began}
    result["analysis"] = regime_report.analyse(result)
    regime_report.write(result, args.out)
    log(f"regime {regime.name} done in {result['total_s'] / 60:.1f} min; results in {args.out}")
    return result
