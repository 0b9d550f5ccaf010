"""Re-run only the default ``lore`` rows of the regime benchmark with the current code and
compare their losses with the stored ``results/regime-NAME.json`` (made with the old solver).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python bench/quality/recheck.py \
        [--regimes skills,skills-lora,heavy,replay] [--seeds 0,1] [--tol 0.002]

Per regime and cached seed it rebuilds what ``regime_run.main`` builds (task data, eval sets,
``Scorer``) with the pipeline's own functions, keeps from ``merges.regime_baselines`` only the
``lore`` rows ("lore no base (defaults)", "lore base (defaults)") and runs them through
``regime_run._mergekit_rows`` (mergekit ``run_merge`` in process, as the pipeline does).
Nothing is trained: ``train.train`` is replaced by a guard, and a regime/seed whose models are
not cached is skipped. Merge configs/outputs go to ``--scratch`` (outputs deleted after scoring),
not into the benchmark's workdir. Writes ``results/recheck.md`` after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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
from bench.quality import regime_run  # noqa: E402
from bench.quality import regimes as qregimes  # noqa: E402
from bench.quality import run as qrun  # noqa: E402
from bench.quality import train as qtrain  # noqa: E402

log = qrun.log


class NotCached(RuntimeError):
    pass


def _no_training(*args, **kwargs):
    raise NotCached("a needed model is not cached (recheck never trains)")


def code_provenance():
    """Where ``mergekit_lore`` is imported from, and which of its files differ from git HEAD
    (read-only ``git show``; the checkout may be edited while this runs)."""
    import subprocess

    import mergekit_lore

    pkg = Path(mergekit_lore.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    differ = []
    for f in sorted(pkg.glob("*.py")):
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:mergekit_lore/{f.name}"],
                               capture_output=True)
        if shown.returncode != 0:
            differ.append(f"{f.name} (not in HEAD)")
        elif shown.stdout != f.read_bytes():
            differ.append(f.name)
    return {"package": str(pkg), "head": head, "differ": differ}


SUBSPACE = {"calls": 0, "fallbacks": 0, "fallback_s": 0.0}


def _count_subspace():
    """Count the matrix-free fast path's solves and its fall-backs to the dense solver."""
    from mergekit_lore import solver

    inner = getattr(solver, "solve_on_subspaces", None)
    if inner is None:
        return False

    def counted(*args, **kwargs):
        began = time.perf_counter()
        out = inner(*args, **kwargs)
        SUBSPACE["calls"] += 1
        SUBSPACE["fallbacks"] += out is None
        if out is None:
            SUBSPACE["fallback_s"] += time.perf_counter() - began
        return out

    solver.solve_on_subspaces = counted
    return True


SOLVES = []  # one entry per solve_lore call (one per weight matrix)


def _count_solves():
    """Record each ``solve_lore`` result: outer iterations, path, kept ranks, convergence, seconds.

    path: ``subspace`` (the matrix-free fast path's solution), ``fallback`` (``solve_on_subspaces`` was
    called and returned None, so the dense solver ran), ``dense`` (the fast path was not called: closed
    form, fixed base, ``cd``). ``solve_lore`` is imported by name into ``lore`` and ``core_space``, so
    those references are replaced too.
    """
    import importlib

    from mergekit_lore import solver

    inner = getattr(solver, "solve_lore", None)
    if inner is None:
        return False

    def counted(*args, **kwargs):
        calls = SUBSPACE["calls"]
        began = time.perf_counter()
        out = inner(*args, **kwargs)
        seconds = time.perf_counter() - began
        backends = list(getattr(out, "backends", []) or [])
        if backends == ["subspace"]:
            path = "subspace"
        elif SUBSPACE["calls"] > calls:
            path = "fallback"
        else:
            path = "dense"
        ranks = [d.rank for d in out.deltas]
        SOLVES.append({"iterations": int(out.iterations), "path": path, "rank_max": max(ranks, default=0),
                       "converged": bool(out.converged), "seconds": seconds})
        return out

    solver.solve_lore = counted
    for name in ("mergekit_lore.lore", "mergekit_lore.core_space"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "solve_lore", None) is inner:
            module.solve_lore = counted
    return True


def _solve_stats(solves):
    """Per-merge summary of the ``SOLVES`` entries of its matrices."""
    if not solves:
        return {}
    iters = [s["iterations"] for s in solves]
    return {"matrices": len(solves), "iters_mean": sum(iters) / len(iters), "iters_max": max(iters),
            "n_subspace": sum(s["path"] == "subspace" for s in solves),
            "n_fallback": sum(s["path"] == "fallback" for s in solves),
            "n_dense": sum(s["path"] == "dense" for s in solves),
            "rank_max": max(s["rank_max"] for s in solves),
            "unconverged": sum(not s["converged"] for s in solves),
            "solve_s": sum(s["seconds"] for s in solves)}


def _fmt_solves(st):
    if not st:
        return "- | - | - | - | -"
    paths = f"{st['n_subspace']} / {st['n_fallback']}" + (f" (+{st['n_dense']} dense)" if st["n_dense"] else "")
    return (f"{st['iters_mean']:.1f} / {st['iters_max']} | {paths} | {st['rank_max']} | {st['unconverged']} "
            f"| {st['solve_s']:.1f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default="skills,skills-lora,heavy,replay")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--tol", type=float, default=0.002, help="accepted |new - stored| test loss (nats)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-lore-quality"),
                   help="the benchmark's cache of data and trained models (read only)")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/mergekit-lore-recheck"),
                   help="where the merge configs and (temporarily) merged models go")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where regime-NAME.json are")
    p.add_argument("--out", type=Path, default=HERE / "results" / "recheck.md")
    p.add_argument("--also-old", metavar="REV", default="",
                   help="also run the same merges first with mergekit_lore as of git REV (extracted with "
                        "`git archive` to a temp dir, run in a subprocess) and add its test loss and seconds, "
                        "measured on this machine now, to the table")
    p.add_argument("--emit-json", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--order", choices=("seed", "regime"), default="seed",
                   help="seed: every regime's seed 0 first, then seed 1 (default); regime: regime by regime")
    return p.parse_args(argv)


def _stored(results: Path, regime: str):
    path = results / f"regime-{regime}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _stored_row(stored, seed: int, name: str):
    for s in stored["per_seed"]:
        if s["seed"] == seed:
            for r in s["records"]:
                if r.get("name") == name and r.get("via") != "in-process":
                    return r
    return None


def _max_split_diff(new: dict, old: dict, split: str = "test") -> float:
    """Largest |diff| over the individual test losses (each task and each general domain)."""
    a, b = new.get(split) or {}, old.get(split) or {}
    keys = set(a) & set(b)
    return max((abs(a[k] - b[k]) for k in keys), default=float("nan"))


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def _run_old(cli):
    """The same recheck with ``mergekit_lore`` from git ``cli.also_old``, in a subprocess."""
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="recheck-old-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", cli.also_old, "mergekit_lore"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    out_json = tmp / "old.json"
    env = dict(os.environ, PYTHONPATH=f"{tmp}:{REPO}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--regimes", cli.regimes, "--seeds", cli.seeds,
           "--workdir", str(cli.workdir), "--scratch", str(cli.scratch), "--results", str(cli.results),
           "--order", cli.order, "--out", str(tmp / "old.md"), "--emit-json", str(out_json)]
    log(f"old code ({cli.also_old}) from {tmp}")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out_json.exists():
        log("old-code run FAILED:\n" + done.stdout[-2000:] + done.stderr[-2000:])
        return {"rev": cli.also_old, "error": (done.stdout + done.stderr)[-500:], "rows": {}}
    data = json.loads(out_json.read_text())
    return {"rev": cli.also_old, "prov": data["prov"],
            "rows": {(r["regime"], r["seed"], r["merge"]): r for r in data["rows"]}}


def _vs_old(row, old_row):
    """(new - old code mean test loss, max per-loss |new - old code|) of one merge; Nones if either is missing."""
    if row.get("new_test") is None or not old_row or old_row.get("new_test") is None:
        return None, None
    per_loss = None
    if row.get("test") and old_row.get("test"):
        per_loss = _max_split_diff({"test": row["test"]}, {"test": old_row["test"]})
    return row["new_test"] - old_row["new_test"], per_loss


def write_md(out: Path, command: str, rows, notes, base_checks, tol, began_utc, finished: bool, prov=None,
             old=None):
    lines = ["# Recheck of the default `lore` rows after the solver change", "",
             "Command (from the repository root):", "", "```bash", command, "```", ""]
    if prov:
        lines += [f"Code: `mergekit_lore` from `{prov['package']}`; git HEAD {prov['head']}; files differing "
                  f"from HEAD: {', '.join(prov['differ']) or 'none'}.", ""]
    lines += [
             f"Started {began_utc} UTC" + ("" if finished else " (partial: still running or interrupted)") + ".",
             "Stored values: `bench/quality/results/regime-NAME.json` (old solver); new: the current code, "
             "same cached models, same `merges.regime_baselines` configs, same `regime_run.Scorer`, "
             "mergekit `run_merge` in process (as `regime_run._mergekit_rows`).", "",
             f"Test loss = mean test cross-entropy over the regime's tasks (nats/token); "
             f"max per-loss abs(diff) = largest abs(diff) over the individual test losses (each task and, for "
             f"skills, each `general:` domain). Tolerance {tol:g} nats.", "",
             "| regime | seed | merge | stored test | new test | diff | abs(diff) <= "
             f"{tol:g}? | max per-loss abs(diff) | stored val | new val | stored s | new s | subspace solves (fall-backs, s in them) "
             "| iters mean / max | subspace / fallback | max kept rank | unconverged | solve_lore s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if old is not None:
        lines[-2] = lines[-2] + (f" old code {old['rev']} test (now) | new - old code | max per-loss abs(new - old "
                                 "code) | old code s (now) | old iters mean / max "
                                 "| old subspace / fallback | old max kept rank | old unconverged | old solve_lore s |")
        lines[-1] = lines[-1] + "---|---|---|---|---|---|---|---|---|"
    for r in rows:
        extra = ""
        if old is not None:
            o = old["rows"].get((r["regime"], r["seed"], r["merge"]), {})
            vs_old = _vs_old(r, o)
            extra = (f" {_fmt(o.get('new_test'))} | {_fmt(vs_old[0], '+.5f')} | {_fmt(vs_old[1], '.5f')} "
                     f"| {_fmt(o.get('new_s'), '.1f')} | "
                     f"{_fmt_solves(o.get('solves'))} |")
        lines.append(
            f"| {r['regime']} | {r['seed']} | {r['merge']} | {_fmt(r['stored_test'])} | {_fmt(r['new_test'])} "
            f"| {_fmt(r['diff'], '+.5f')} | {r['ok']} | {_fmt(r['max_diff'], '.5f')} | {_fmt(r['stored_val'])} "
            f"| {_fmt(r['new_val'])} | {_fmt(r['stored_s'], '.1f')} | {_fmt(r['new_s'], '.1f')} "
            f"| {r.get('subspace', '-')} | {_fmt_solves(r.get('solves'))} |" + extra)
    scored = [r for r in rows if r["diff"] is not None]
    if scored:
        worst = max(abs(r["diff"]) for r in scored)
        lines += ["", f"{sum(r['ok'] == 'yes' for r in scored)}/{len(scored)} rows within {tol:g}; "
                      f"largest |diff| of the mean test loss {worst:.5f}; largest per-loss |diff| "
                      f"{max(r['max_diff'] for r in scored):.5f}."]
    if old is not None:
        timed = [(r, old["rows"].get((r["regime"], r["seed"], r["merge"]))) for r in rows]
        timed = [(r, o) for r, o in timed if o and o.get("new_s") and r.get("new_s")]
        compared = [_vs_old(r, old["rows"].get((r["regime"], r["seed"], r["merge"]), {})) for r in rows]
        compared = [c for c in compared if c[0] is not None]
        if compared:
            lines += ["", f"Current vs old code ({old['rev']}) on the same models now: "
                          f"{sum(abs(d) <= tol for d, _ in compared)}/{len(compared)} rows within {tol:g}; largest "
                          f"|diff| of the mean test loss {max(abs(d) for d, _ in compared):.5f}; largest per-loss "
                          f"|diff| {max((m for _, m in compared if m is not None), default=float('nan')):.5f}."]
        if timed:
            lines += ["", f"Same machine, same session: old code ({old['rev']}) {sum(o['new_s'] for _, o in timed):.1f} s "
                          f"vs current code {sum(r['new_s'] for r, _ in timed):.1f} s over these {len(timed)} merges "
                          "(old-code run first, then the current code)."]
            solve_new = sum((r.get("solves") or {}).get("solve_s", 0.0) for r, _ in timed)
            solve_old = sum((o.get("solves") or {}).get("solve_s", 0.0) for _, o in timed)
            lines += ["", f"Of which in `solve_lore`: old code {solve_old:.1f} s vs current code {solve_new:.1f} s."]
        if old.get("error"):
            lines += ["", f"Old-code run failed: `{old['error']}`"]
    if base_checks:
        lines += ["", "Sanity check of the set-up (the un-merged base scored now vs stored, seed-0 row):", "",
                  "| regime | stored base test | new base test | diff |", "|---|---|---|---|"]
        for b in base_checks:
            lines.append(f"| {b['regime']} | {_fmt(b['stored'])} | {_fmt(b['new'])} | {_fmt(b['diff'], '+.6f')} |")
        off = [b["regime"] for b in base_checks if b["diff"] is not None and abs(b["diff"]) > tol]
        if off:
            lines += ["", f"**The base scores differently from the stored one by more than {tol:g} in "
                          f"{', '.join(off)}: the cached models are not the ones the stored JSONs were made with, "
                          "so the stored-vs-new columns compare different models; "
                          + ("compare the current code with the old-code columns instead.**" if old is not None
                             else "rerun with --also-old REV to compare two codes on the same models.**")]
    lines += ["", "Subspace solves: calls of the matrix-free fast path (`solver.solve_on_subspaces`) during "
                  "the merge, how many of them returned None, so the dense solver ran (kept rank past a quarter "
                  "of the short side, i.e. 32 for these 128-wide matrices; since 2243569 also before any "
                  "iteration, when the first sketch, sized from the threshold block's expected kept rank + 6 (at least 20 columns), "
                  "would already be past that limit), and the seconds spent in those "
                  "given-up attempts (part of new s).",
              "", "Solver columns (one `solve_lore` call per weight matrix, recorded by wrapping it): outer "
                  "iterations per matrix (`LoreSolution.iterations`, mean / max over the merge's matrices); how "
                  "many matrices the matrix-free path solved (`backends == ['subspace']`) / how many fell back to "
                  "the dense solver after `solve_on_subspaces` returned None (\"dense\": the fast path was not "
                  "called at all); the largest kept rank (`LoreSolution.ranks`) over matrices and models; matrices "
                  "with `converged` False; seconds inside `solve_lore` summed over the merge (part of new s).",
              "", "Merge seconds: the stored ones are from the original runs (machine shared, load average "
                  "4-8 per README), the new ones from this run; one thread each. Only indicative."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv=None):
    cli = parse_args(argv)
    old_code = _run_old(cli) if cli.also_old else None
    command = (f"OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH={os.environ.get('PYTHONPATH', '')} "
               f"{sys.executable} bench/quality/recheck.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                             if (argv if argv is not None else sys.argv[1:]) else ""))
    began_utc = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    qtrain.train = _no_training  # the guard: ensure_models / ensure_finetunes must find everything cached
    args = qrun.parse_args(["--workdir", str(cli.workdir)])  # the pipeline's defaults (preset full)
    preset = qrun.PRESETS[args.preset]
    rows, notes, base_checks = [], [], []
    prov = code_provenance()
    if not _count_subspace():
        notes.append("mergekit_lore.solver has no solve_on_subspaces: the fast path was not counted")
    if not _count_solves():
        notes.append("mergekit_lore.solver has no solve_lore: per-matrix solves were not recorded")
    log(f"mergekit_lore from {prov['package']}; HEAD {prov['head']}; differing from HEAD: {prov['differ']}")
    regimes = [r.strip() for r in cli.regimes.split(",") if r.strip()]
    seeds = [int(s) for s in cli.seeds.split(",")]

    def flush(finished=False):
        write_md(cli.out, command, rows, notes, base_checks, cli.tol, began_utc, finished, prov, old_code)

    with qrun.thread_limits(1):
        from transformers import PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        args.workdir = args.workdir.resolve()
        domains = [qdata.Domain.parse(s) for s in qdata.DEFAULT_DOMAINS]
        shape = preset["shape"]
        corpus = qdata.prepare(domains, args.workdir / "data", vocab_size=shape.vocab, seq_len=shape.seq_len,
                               max_chars=preset["max_chars"], chunk_chars=preset["chunk_chars"])
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(corpus.tokenizer))
        eos_id = tokenizer.convert_tokens_to_ids(qdata.EOS)
        try:
            models = qrun.ensure_models(args, preset, corpus, eos_id)
        except NotCached as exc:
            notes.append(f"pre-trained base not cached: {exc}; nothing rechecked")
            flush(True)
            return rows
        texts = qdata.domain_texts(domains, preset["max_chars"], preset["chunk_chars"])
        base = models["base"]

        contexts = {}

        def context(name):
            """What regime_run.main builds for a regime: data, tasks, eval sets, scorer."""
            if name not in contexts:
                regime = qregimes.REGIMES[name]
                limits = {"val": preset["eval_val"], "test": preset["eval_test"], "train": 0}
                data = qregimes.task_data(regime, corpus, texts, tokenizer, shape.seq_len, limits)
                tasks = qregimes.task_names(regime, corpus.names)
                data["train"] = {t: data["train"][t] for t in tasks}
                eval_sets = regime_run._eval_sets(data, corpus, preset, regime.kind == "skills")
                scorer = regime_run.Scorer(base, eval_sets, tasks)
                contexts[name] = (regime, data, scorer)
                stored = _stored(cli.results, name)
                ref = _stored_row(stored, seeds[0], "base") if stored else None
                new = scorer.folder(base)
                base_checks.append({"regime": name, "stored": ref["test_mean"] if ref else None,
                                    "new": new["test_mean"],
                                    "diff": new["test_mean"] - ref["test_mean"] if ref else None})
                log(f"{name}: base test now {new['test_mean']:.6f}, stored "
                    f"{ref['test_mean'] if ref else float('nan'):.6f}")
            return contexts[name]

        def lore_plan(scenario, models_, base_):
            return [m for m in qmerges.regime_baselines(scenario, models_, base_) if m.method == "lore"]

        if cli.order == "seed":
            order = [(r, s) for s in seeds for r in regimes]
        else:
            order = [(r, s) for r in regimes for s in seeds]
        for name, seed in order:
            stored = _stored(cli.results, name)
            if stored is None:
                notes.append(f"{name}: no results/regime-{name}.json; skipped")
                flush()
                continue
            if seed not in stored["seeds"]:
                notes.append(f"{name} seed {seed}: not in the stored JSON; skipped")
                flush()
                continue
            if not (args.workdir / "models" / name / f"seed{seed}").is_dir():
                notes.append(f"{name} seed {seed}: models not cached under {args.workdir}/models; skipped")
                flush()
                continue
            regime, data, scorer = context(name)
            try:
                paths, _ = qregimes.ensure_finetunes(regime, seed, base, models["pre_key"], data["train"],
                                                     corpus.blocks["train"], corpus.tokenizer,
                                                     args.workdir / "models", log)
            except NotCached:
                notes.append(f"{name} seed {seed}: a fine-tune is missing or its cache key differs; skipped")
                flush()
                continue
            counts, solves = [], []

            def lore_plan_counted(scenario, models_, base_):
                plan = lore_plan(scenario, models_, base_)
                for merge in plan:  # snapshot the counter around each merge's run
                    run = merge.run

                    def counted_run(*a, _run=run, **k):
                        before = dict(SUBSPACE)
                        first = len(SOLVES)
                        out = _run(*a, **k)
                        solves.append(_solve_stats(SOLVES[first:]))
                        counts.append(f"{SUBSPACE['calls'] - before['calls']} "
                                      f"({SUBSPACE['fallbacks'] - before['fallbacks']}, "
                                      f"{SUBSPACE['fallback_s'] - before['fallback_s']:.1f} s)")
                        return out

                    merge.run = counted_run
                return plan

            new_rows = regime_run._mergekit_rows(seed, paths, base, scorer, cli.scratch / name, lore_plan_counted,
                                                 log)
            for new, count, solve in zip(new_rows, counts, solves):
                old = _stored_row(stored, seed, new["name"])
                row = {"regime": name, "seed": seed, "merge": new["name"],
                       "stored_test": old.get("test_mean") if old else None,
                       "new_test": new.get("test_mean"), "stored_val": old.get("val_mean") if old else None,
                       "new_val": new.get("val_mean"), "stored_s": old.get("seconds") if old else None,
                       "new_s": new.get("seconds"), "diff": None, "ok": "n/a", "max_diff": None,
                       "subspace": count, "solves": solve, "test": new.get("test")}
                if new.get("returncode") != 0:
                    notes.append(f"{name} seed {seed} {new['name']}: merge FAILED: {new.get('error', '')[-300:]}")
                    row["ok"] = "FAILED"
                elif old is not None:
                    row["diff"] = new["test_mean"] - old["test_mean"]
                    row["ok"] = "yes" if abs(row["diff"]) <= cli.tol else "NO"
                    row["max_diff"] = _max_split_diff(new, old)
                rows.append(row)
                log(f"{name} seed {seed} {new['name']}: stored {_fmt(row['stored_test'])} new "
                    f"{_fmt(row['new_test'])} diff {_fmt(row['diff'], '+.5f')} ({row['ok']})")
                flush()
    flush(True)
    if cli.emit_json:
        cli.emit_json.write_text(json.dumps({"rows": rows, "prov": prov}))
    print(cli.out.read_text())
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
