"""Small Llama models: config, training loop, checkpoints, evaluation."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from mergekit_lore.demo import TinyLlamaShape
from mergekit_lore.demo import llama_config as demo_llama_config


@dataclass(frozen=True)
class Shape(TinyLlamaShape):
    """The demo's Llama shape plus the training sequence length."""

    seq_len: int = 128


def llama_config(shape: Shape, eos_id: int):
    return demo_llama_config(shape, max_position_embeddings=shape.seq_len,
                             bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def new_model(shape: Shape, eos_id: int, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape, eos_id))


def load_model(path: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def save_model(model, path: Path, tokenizer_dir: Path, meta: Dict[str, object]) -> Path:
    """``save_pretrained`` plus the tokenizer files, then a ``done.json`` marker."""
    path = Path(path).resolve()
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(str(path), safe_serialization=True)
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file():
            shutil.copy(item, path / item.name)
    (path / "done.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path


def cached(path: Path, key: str) -> bool:
    marker = Path(path) / "done.json"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("key") == key
    except ValueError:
        return False


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup: int
    batch: int
    weight_decay: float = 0.01

    def rate(self, step: int) -> float:
        """Linear warmup, then constant (checkpoints along the run stay distinct)."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup))


def train(
    model,
    domains: Dict[str, torch.Tensor],
    schedule: Schedule,
    seed: int,
    *,
    on_step: Optional[Callable[[int, object], None]] = None,
    log: Callable[[str], None] = print,
    label: str = "train",
    mixture: Optional[Dict[str, float]] = None,
) -> Dict[str, float]:
    """AdamW on random blocks; each sequence's domain is drawn from ``domains``
    (uniformly, or with the probabilities ``mixture``, e.g. a task plus a replay of the
    pre-training domains).

    ``on_step(step, model)`` runs after every optimiser step (1-based), e.g. to save
    checkpoints. Only parameters with ``requires_grad`` are trained (LoRA adapters).
    """
    generator = torch.Generator().manual_seed(seed)
    names = sorted(domains)
    probs = torch.tensor([float((mixture or {}).get(n, 1.0)) for n in names], dtype=torch.float64)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=schedule.lr, betas=(0.9, 0.95),
        weight_decay=schedule.weight_decay,
    )
    model.train()
    began = time.perf_counter()
    recent = []
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.rate(step)
        if mixture is None:  # uniform (the stream the cached heavy-regime models were trained with)
            picks = torch.randint(len(names), (schedule.batch,), generator=generator)
        else:
            picks = torch.multinomial(probs, schedule.batch, replacement=True, generator=generator)
        rows = []
        for pick in picks.tolist():
            table = domains[names[pick]]
            rows.append(table[int(torch.randint(table.shape[0], (1,), generator=generator))])
        batch = torch.stack(rows)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(float(loss.detach()))
        if (step + 1) % max(1, schedule.steps // 5) == 0 or step + 1 == schedule.steps:
            log(f"  {label}: step {step + 1}/{schedule.steps} loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - began:.0f} s)")
            recent = []
        if on_step is not None:
            on_step(step + 1, model)
    model.eval()
    return {"seconds": time.perf_counter() - began}


@torch.no_grad()
def evaluate(model, blocks: Dict[str, torch.Tensor], batch: int = 32) -> Dict[str, float]:
    """Mean next-token cross-entropy (nats/token) per domain."""
    model.eval()
    out = {}
    for name, table in blocks.items():
        total, count = 0.0, 0
        for start in range(0, table.shape[0], batch):
            ids = table[start : start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += target.numel()
        out[name] = total / count
    return out


def state_of(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def divergence(
    base: Dict[str, torch.Tensor], models: Dict[str, Dict[str, torch.Tensor]], top_fraction: float = 0.1
) -> Dict[str, object]:
    """How far the models moved from ``base`` and from each other.

    - ``rel_dist``: ||theta_i - base|| / ||base|| over all weights
    - ``cosine``: cosine between flattened task vectors theta_i - base (pairwise)
    - ``pair_rel_dist``: ||theta_i - theta_j|| / ||base||
    - ``top_energy``: mean over 2-D weights of the fraction of ||theta_i - base||_F^2
      held by the top ``top_fraction`` singular values (1.0 = very low rank)
    """
    names = list(models)
    base_norm = math.sqrt(sum(float(v.pow(2).sum()) for v in base.values()))
    vectors = {n: torch.cat([(models[n][k] - base[k]).flatten() for k in base]) for n in names}
    out: Dict[str, object] = {"rel_dist": {}, "cosine": {}, "pair_rel_dist": {}, "top_energy": {}}
    for n in names:
        out["rel_dist"][n] = float(vectors[n].norm()) / base_norm
        fractions = []
        for k, w in base.items():
            if w.ndim != 2:
                continue
            s = torch.linalg.svdvals(models[n][k] - w)
            energy = s.pow(2)
            keep = max(1, int(round(top_fraction * len(s))))
            if float(energy.sum()) > 0:
                fractions.append(float(energy[:keep].sum() / energy.sum()))
        out["top_energy"][n] = sum(fractions) / max(1, len(fractions))
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            va, vb = vectors[a], vectors[b]
            out["cosine"][f"{a}|{b}"] = float(va @ vb / (va.norm() * vb.norm() + 1e-30))
            out["pair_rel_dist"][f"{a}|{b}"] = float((va - vb).norm()) / base_norm
    return out
