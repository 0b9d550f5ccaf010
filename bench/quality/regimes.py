"""Fine-tuning regimes: what the fine-tunes learn and how far they move from the base.

- ``heavy``: the original scenario (one fine-tune per domain, lr 1e-3, no replay): the
  fine-tunes overwrite the base (11-15% relative distance) and averaging wins.
- ``skills``: one full fine-tune per skill behind a prefix (``skills.py``), half of every
  batch replays the pre-training mixture, gentle learning rate.
- ``skills-lora``: the same data with rank-8 LoRA adapters (PEFT) on every linear layer
  of the blocks, merged into the weights: task vectors of rank <= 8 (LoRE's premise).
- ``replay``: domain fine-tunes, half of every batch replays the mixture, lr 3e-4.

Models are cached under ``workdir/models/<regime>/seed<k>/`` keyed by everything that
determines them. The base (pre-trained model) is shared by all regimes and seeds; the
training seed changes the fine-tunes' data order (and the LoRA initialisation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from bench.quality import skills as qskills
from bench.quality import train as qtrain

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Regime:
    name: str
    kind: str  # "domains" | "skills"
    finetune: qtrain.Schedule
    replay: float = 0.0  # share of each batch drawn from the pre-training mixture
    lora_rank: int = 0  # 0: full fine-tune
    skills: Tuple[str, ...] = ()
    description: str = ""


# Four of the skills in skills.py (six were planned; four fit the shared 2-core budget).
SKILLS4 = ("upper", "snake", "leet", "rot13")

REGIMES: Dict[str, Regime] = {
    "heavy": Regime("heavy", "domains", qtrain.Schedule(steps=100, lr=1e-3, warmup=10, batch=16),
                    description="domain fine-tunes, lr 1e-3, 100 steps, no replay (the original task scenario)"),
    "skills": Regime("skills", "skills", qtrain.Schedule(steps=250, lr=3e-4, warmup=20, batch=16),
                     replay=0.5, skills=SKILLS4,
                     description="4 skills behind a prefix, full fine-tunes, lr 3e-4, 250 steps, 50% replay"),
    "skills-lora": Regime("skills-lora", "skills", qtrain.Schedule(steps=250, lr=2e-3, warmup=20, batch=16,
                                                                   weight_decay=0.0),
                          replay=0.5, lora_rank=8, skills=SKILLS4,
                          description="4 skills behind a prefix, LoRA rank 8 (alpha 16) on all block linears, "
                                      "lr 2e-3, 250 steps, 50% replay, merged into the weights"),
    "replay": Regime("replay", "domains", qtrain.Schedule(steps=200, lr=3e-4, warmup=20, batch=16),
                     replay=0.5, description="domain fine-tunes, lr 3e-4, 200 steps, 50% replay"),
}

TINY = {name: Regime(r.name, r.kind, qtrain.Schedule(steps=3, lr=r.finetune.lr, warmup=1, batch=4),
                     r.replay, r.lora_rank, r.skills[:2], r.description) for name, r in REGIMES.items()}


def task_names(regime: Regime, domains: List[str]) -> List[str]:
    return list(regime.skills) if regime.kind == "skills" else list(domains)


def task_data(regime: Regime, corpus, texts, tokenizer, seq_len: int, limits: Dict[str, int]):
    """split -> task -> blocks. Skill blocks are built from the same split's pieces."""
    if regime.kind == "domains":
        return {split: dict(corpus.blocks[split]) for split in ("train", "val", "test")}
    out = {}
    for split in ("train", "val", "test"):
        pieces = qskills.mixed_pieces(texts, split)
        out[split] = {s: qskills.skill_blocks(tokenizer, pieces, s, seq_len, limit=limits.get(split, 0),
                                              segment_chars=min(480, 4 * seq_len))
                      for s in regime.skills}
    return out


def _finetune_one(regime: Regime, base: Path, task: str, train_blocks, general, seed: int, log):
    model = qtrain.load_model(base)
    if regime.lora_rank:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        config = LoraConfig(r=regime.lora_rank, lora_alpha=2 * regime.lora_rank, lora_dropout=0.0,
                            target_modules=list(LORA_TARGETS))
        model = get_peft_model(model, config)
    data = {f"task:{task}": train_blocks}
    mixture = None
    if regime.replay > 0:
        data.update({f"replay:{d}": b for d, b in general.items()})
        mixture = {f"task:{task}": 1.0 - regime.replay}
        mixture.update({f"replay:{d}": regime.replay / len(general) for d in general})
    seconds = qtrain.train(model, data, regime.finetune, seed, log=log, label=f"{regime.name}-{task}",
                           mixture=mixture)["seconds"]
    if regime.lora_rank:
        model = model.merge_and_unload()
    return model, seconds


def ensure_finetunes(regime: Regime, seed: int, base: Path, pre_key: str, tasks: Dict[str, torch.Tensor],
                     general: Dict[str, torch.Tensor], tokenizer_dir: Path, root: Path,
                     log: Callable[[str], None]) -> Tuple[Dict[str, Path], Dict[str, float]]:
    """One fine-tune per task from ``base``; cached. Returns paths and training seconds."""
    paths, timings = {}, {}
    for index, task in enumerate(tasks):
        path = (root / regime.name / f"seed{seed}" / task).resolve()
        ft_seed = 1000 * seed + index + 1
        recipe = {k: v for k, v in asdict(regime).items() if k not in ("skills", "description")}
        key = qtrain.cache_key("regime-ft", pre_key, recipe, ft_seed, task, int(tasks[task].shape[0]))
        paths[task] = path
        if qtrain.cached(path, key):
            continue
        log(f"fine-tuning {regime.name} seed {seed} on {task}")
        model, seconds = _finetune_one(regime, base, task, tasks[task], general, ft_seed, log)
        timings[f"{task}_s"] = seconds
        qtrain.save_model(model, path, tokenizer_dir, {"key": key})
    return paths, timings
