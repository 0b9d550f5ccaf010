"""Held-out loss of merged LoRA adapters: merge-adapters (lore) vs PEFT combinations vs dense merges.

Setting: the quality benchmark's pre-trained tiny Llama and domains (``bench/quality``, reused
through its own helpers and cache; nothing is edited there). Per training seed, one rank-8
LoRA (alpha 16, all linear projections, 150 steps, lr 3e-3) per domain, then every merge of
the three adapters is scored by mean next-token loss over the domains:

- rank 8 (the adapters' rank): lore ``--rank 8``, PEFT linear, svd / ties_svd / dare_ties_svd
  with ``svd_rank`` 8;
- rank 24 (= n r, exact): lore (exact), PEFT cat (= dense task arithmetic / linear on the
  merged-in weights), svd / ties_svd / dare_ties_svd with ``svd_rank`` 24;
- dense TIES (mergekit's sparsify + sign election on the merged-in weights, density 0.5).

Every method gets the same weight grid (PEFT's per-adapter weight, lore's lambda, TIES's
lambda): 0.33, 0.5, 0.75, 1.0, chosen per seed on **val**, reported on **test**. ``ties``
densities are 0.5; lore uses its defaults otherwise (anchor, mu_ratio 0.2, combine sum).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

GRID = [0.33, 0.5, 0.75, 1.0]
LORA_RANK = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_loras(base: Path, corpus, seed: int, root: Path) -> List[Path]:
    import peft

    from bench.quality import train as qtrain

    schedule = qtrain.Schedule(steps=150, lr=3e-3, warmup=10, batch=16)
    paths = []
    for index, name in enumerate(corpus.names):
        path = root / f"lora_{name}_s{seed}"
        paths.append(path)
        key = qtrain.cache_key("lora", str(base), schedule, seed, index, name, LORA_RANK)
        if qtrain.cached(path, key):
            continue
        model = peft.get_peft_model(qtrain.load_model(base), peft.LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS, lora_dropout=0.0))
        torch.manual_seed(1000 * seed + index)
        qtrain.train(model, {name: corpus.blocks["train"][name]}, schedule, 1000 * seed + index,
                     label=f"lora-{name}-s{seed}")
        model.save_pretrained(path)
        (path / "done.json").write_text(json.dumps({"key": key}))
    return paths


def _score(model, eval_sets) -> Dict[str, Dict[str, float]]:
    from bench.quality import train as qtrain

    return {split: qtrain.evaluate(model, blocks) for split, blocks in eval_sets.items()}


def _peft_rows(model, names, eval_sets) -> List[dict]:
    rows = []
    plans = [("linear", LORA_RANK, {}), ("cat", 3 * LORA_RANK, {})]
    for rank in (LORA_RANK, 3 * LORA_RANK):
        plans += [("svd", rank, {"svd_rank": rank}), ("ties_svd", rank, {"svd_rank": rank, "density": 0.5}),
                  ("dare_ties_svd", rank, {"svd_rank": rank, "density": 0.5})]
    for method, rank, options in plans:
        for weight in GRID:
            torch.manual_seed(0)  # dare's random drop
            model.add_weighted_adapter(names, [weight] * len(names), "merged", combination_type=method, **options)
            model.set_adapter("merged")
            rows.append({"method": f"PEFT {method}", "rank": rank, "weight": weight, **_score(model, eval_sets)})
            model.delete_adapter("merged")
    return rows


def _lore_rows(model, base, adapters, eval_sets) -> List[dict]:
    from mergekit_lore.adapters import merge_adapters

    rows = []
    for rank in (LORA_RANK, None):
        for weight in GRID:
            with tempfile.TemporaryDirectory() as folder:
                result = merge_adapters(base, adapters, Path(folder) / "out", rank=rank, parameters={"lambda": weight})
                model.load_adapter(str(Path(folder) / "out"), adapter_name="lore")
            model.set_adapter("lore")
            ranks = max(m.rank for m in result.modules.values())
            rows.append({"method": "lore merge-adapters", "rank": rank or 3 * LORA_RANK, "weight": weight,
                         "max_rank": ranks, "seconds": result.seconds, **_score(model, eval_sets)})
            model.delete_adapter("lore")
    return rows


def _dense_ties_rows(base, adapters, eval_sets) -> List[dict]:
    import peft

    from bench.quality import train as qtrain
    from mergekit_lore.combine import ties_combine
    from mergekit_lore.method import _sign_consensus, _trim

    base_state = qtrain.state_of(qtrain.load_model(base))
    merged_in = [qtrain.state_of(peft.PeftModel.from_pretrained(qtrain.load_model(base), str(a)).merge_and_unload())
                 for a in adapters]
    rows = []
    for weight in GRID:
        state = dict(base_state)
        for name, tensor in base_state.items():
            deltas = [m[name] - tensor for m in merged_in]
            if any(d.abs().max() > 0 for d in deltas):
                state[name] = tensor + weight * ties_combine(deltas, [1.0] * 3, [0.5] * 3, _trim, _sign_consensus)
        model = qtrain.load_model(base)
        model.load_state_dict(state)
        rows.append({"method": "dense ties (mergekit)", "rank": "full", "weight": weight, **_score(model, eval_sets)})
    return rows


def seed_rows(base: Path, corpus, eval_sets, seed: int, root: Path) -> List[dict]:
    import peft

    from bench.quality import train as qtrain

    adapters = train_loras(base, corpus, seed, root)
    model = peft.PeftModel.from_pretrained(qtrain.load_model(base), str(adapters[0]), adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    names = [f"a{i}" for i in range(len(adapters))]
    rows = []
    with model.disable_adapter():
        rows.append({"method": "base (no adapter)", "rank": 0, "weight": None, **_score(model, eval_sets)})
    for name, domain in zip(names, corpus.names):
        model.set_adapter(name)
        rows.append({"method": f"single adapter {domain}", "rank": LORA_RANK, "weight": None,
                     **_score(model, eval_sets)})
    rows += _peft_rows(model, names, eval_sets)
    rows += _lore_rows(model, base, adapters, eval_sets)
    rows += _dense_ties_rows(base, adapters, eval_sets)
    for row in rows:
        row["seed"] = seed
        for split in ("val", "test"):
            row[f"{split}_mean"] = statistics.fmean(row[split].values())
    return rows


def summary(rows: List[dict]) -> str:
    """Per (method, rank): weight chosen on val per seed, test mean loss mean ± std over seeds."""
    seeds = sorted({r["seed"] for r in rows})
    keys = list(dict.fromkeys((r["method"], r["rank"]) for r in rows))
    lines = ["| method | output rank | test loss (mean over domains) | per-seed chosen weight | "
             "test per domain |", "|---|---|---|---|---|"]
    for method, rank in keys:
        picks = []
        for seed in seeds:
            cells = [r for r in rows if r["method"] == method and r["rank"] == rank and r["seed"] == seed]
            picks.append(min(cells, key=lambda r: r["val_mean"]))
        tests = [p["test_mean"] for p in picks]
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        domains = ", ".join(f"{d} {statistics.fmean(p['test'][d] for p in picks):.3f}" for d in picks[0]["test"])
        lines.append(f"| {method} | {rank} | {statistics.fmean(tests):.4f} ± {spread:.4f} | "
                     f"{', '.join(str(p['weight']) for p in picks)} | {domains} |")
    return "\n".join(lines)


def quality_main(args: argparse.Namespace) -> None:
    from transformers import PreTrainedTokenizerFast

    from bench.quality import data as qdata
    from bench.quality import run as qrun

    preset = qrun.PRESETS["full"]
    shape = preset["shape"]
    domains = [qdata.Domain.parse(s) for s in qdata.DEFAULT_DOMAINS]
    corpus = qdata.prepare(domains, args.workdir / "data", vocab_size=shape.vocab, seq_len=shape.seq_len,
                           max_chars=preset["max_chars"], chunk_chars=preset["chunk_chars"])
    eos_id = PreTrainedTokenizerFast.from_pretrained(str(corpus.tokenizer)).convert_tokens_to_ids(qdata.EOS)
    models = qrun.ensure_models(argparse.Namespace(workdir=args.workdir, seed=0), preset, corpus, eos_id)
    eval_sets = {"val": {d: corpus.blocks["val"][d][: preset["eval_val"]] for d in corpus.names},
                 "test": {d: corpus.blocks["test"][d][: preset["eval_test"]] for d in corpus.names}}
    root = args.out.parent / "loras"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows += seed_rows(Path(models["base"]), corpus, eval_sets, seed, root)
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"seed {seed} done", flush=True)
    print(summary(rows))
