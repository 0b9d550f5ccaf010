"""Build small Llama models locally (no download) and merge them with ``lore``.

Used by ``mergekit-lore demo``, the tests and the benchmarks. A "fine-tune" is the
base plus a planted low-rank update per matrix and a little dense noise, which is
the structure LoRE-Merging assumes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from mergekit_lore.runner import load_weights, run_mergekit_yaml  # noqa: F401  (part of the demo's API)

DEMO_TEXT = (
    "model merging combines the weights of fine tuned language models into one model "
    "low rank estimation finds a shared base and a small task vector for every model "
    "the merged model keeps what each fine tune learned without training again"
)


@dataclass(frozen=True)
class TinyLlamaShape:
    hidden: int = 64
    intermediate: int = 172
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    tie_embeddings: bool = False


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A small word-level tokenizer so mergekit and transformers find one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = sorted(set(DEMO_TEXT.split()))
    vocab = {token: index for index, token in enumerate(specials + words)}
    for index in range(len(vocab), vocab_size):
        vocab[f"<extra_{index}>"] = index
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(path))


def llama_config(shape: TinyLlamaShape, config_class: Optional[type] = None, **overrides: object):
    """A transformers config for ``shape`` (``LlamaConfig`` unless ``config_class``)."""
    if config_class is None:
        from transformers import LlamaConfig as config_class

    settings: Dict[str, object] = dict(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=128,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return config_class(**settings)


def random_state(shape: TinyLlamaShape, seed: int) -> Dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fine_tune_like(
    base: Dict[str, torch.Tensor],
    seed: int,
    *,
    rank: int = 4,
    strength: float = 0.5,
    noise: float = 0.02,
    shared: float = 0.0,
    shared_seed: int = 999,
) -> Dict[str, torch.Tensor]:
    """``base`` plus a planted rank-``rank`` update per matrix and small dense noise.

    ``strength`` and ``noise`` are relative to each weight's RMS value. ``shared``
    (0 to 1) is the fraction of the update's energy in a direction common to every
    variant built with the same ``shared_seed`` (their task vectors then have
    cosine about ``shared``).
    """
    generator = torch.Generator().manual_seed(seed)
    common = torch.Generator().manual_seed(shared_seed)
    out = {}
    for name, weight in base.items():
        scale = float(weight.float().pow(2).mean().sqrt()) or 1.0
        if weight.ndim == 2:
            rows, cols = weight.shape
            own = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
            update = own * (1.0 - shared) ** 0.5
            if shared:
                joint = torch.randn(rows, rank, generator=common) @ torch.randn(rank, cols, generator=common)
                update += joint * shared**0.5
            update *= strength * scale / (rank**0.5)
        else:
            update = torch.randn(weight.shape, generator=generator) * (strength * scale * 0.1)
        update += torch.randn(weight.shape, generator=generator) * (noise * scale)
        out[name] = (weight.float() + update).to(weight.dtype)
    return out


def save_model(
    path: Path,
    state: Dict[str, torch.Tensor],
    shape: TinyLlamaShape,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save ``state`` as a Llama checkpoint (config, safetensors, tokenizer).

    The model is built on the meta device and takes ``state``'s tensors as they are (no
    random initialisation to overwrite); with tied embeddings the input embedding is saved.
    """
    from transformers import LlamaForCausalLM

    path = Path(path).resolve()
    config = llama_config(shape)
    with torch.device("meta"):  # no random initialisation: every saved weight comes from ``state``
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype).save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(path, shape.vocab)
    return path


def build_family(
    root: Path,
    count: int,
    *,
    shape: TinyLlamaShape = TinyLlamaShape(),
    seed: int = 0,
    rank: int = 4,
    strength: float = 0.5,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
    shared: float = 0.0,
) -> Dict[str, object]:
    """A base model and ``count`` fine-tune-like variants under ``root`` (``fine_tune_like``).

    Returns ``{"base": Path, "models": [Path, ...]}`` with absolute paths.
    """
    root = Path(root).resolve()
    base_state = random_state(shape, seed)
    base = save_model(root / "base", base_state, shape, dtype)
    models = [
        save_model(
            root / f"model_{index}",
            fine_tune_like(base_state, seed + 1000 + index, rank=rank, strength=strength, noise=noise,
                           shared=shared, shared_seed=seed + 999),
            shape,
            dtype,
        )
        for index in range(count)
    ]
    return {"base": base, "models": models}


def lore_config(
    models: Sequence[Path],
    *,
    base: Optional[Path] = None,
    parameters: Optional[Dict[str, object]] = None,
    per_model: Optional[Sequence[Dict[str, object]]] = None,
    dtype: str = "float32",
    method: str = "lore",
    **extra: object,
) -> Dict[str, object]:
    """A mergekit config dict for ``models`` (absolute paths; ``extra`` adds top-level keys)."""
    entries = []
    for index, model in enumerate(models):
        entry: Dict[str, object] = {"model": str(Path(model).resolve())}
        if per_model is not None and per_model[index]:
            entry["parameters"] = dict(per_model[index])
        entries.append(entry)
    config: Dict[str, object] = {"merge_method": method, "models": entries, "dtype": dtype}
    if base is not None:
        config["base_model"] = str(Path(base).resolve())
    if parameters:
        config["parameters"] = dict(parameters)
    config.update(extra)
    return config


def lore_config_yaml(models: Sequence[Path], **options: object) -> str:
    """``lore_config`` as YAML text, the way a user writes it."""
    import yaml

    return yaml.safe_dump(lore_config(models, **options), sort_keys=False)


def run_demo(workdir: Path, *, count: int = 3) -> Path:
    """Build a base and ``count`` variants and merge the variants with ``lore`` twice.

    ``lore.yml`` merges without the base (lore estimates it); ``lore-with-base.yml``
    gives mergekit the base too (``base_mode: anchor``, the default). Both run through
    the stock ``mergekit-yaml``; each merged model must load with transformers and give
    finite logits. Prints how far each merge is from the plain average of the models.
    Returns the directory of the merge without the base.
    """
    workdir = Path(workdir).resolve()
    family = build_family(workdir / "models", count)
    print(f"built a base and {count} fine-tune-like Llama models under {workdir / 'models'}")
    inputs = [load_weights(m) for m in family["models"]]
    outputs = []
    for name, base in (("lore", None), ("lore-with-base", family["base"])):
        config_path = workdir / f"{name}.yml"
        config_path.write_text(lore_config_yaml(family["models"], base=base))
        out = workdir / ("merged" if base is None else "merged-with-base")
        _merge_and_check(config_path, out)
        distance = _distance_from_average(load_weights(out), inputs)
        print(f"merged model: {out} (loads with transformers, forward pass finite); "
              f"mean relative distance of its matrices from the plain average: {distance:.2%}")
        outputs.append(out)
    return outputs[0]


def _merge_and_check(config_path: Path, out: Path) -> None:
    """Run ``mergekit-yaml`` on ``config_path`` and check the model loads and runs."""
    from transformers import AutoModelForCausalLM

    print(f"running: mergekit-yaml {config_path} {out}")
    result = run_mergekit_yaml(config_path, out)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"mergekit-yaml failed with exit code {result.returncode}")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    if not torch.isfinite(logits).all():
        raise SystemExit(f"the merged model {out} produced non-finite logits")


def _distance_from_average(merged: Dict[str, torch.Tensor], inputs: Sequence[Dict[str, torch.Tensor]]) -> float:
    """Mean over matrices of ||merged - average|| / ||merged||."""
    matrices = [k for k, v in merged.items() if v.ndim == 2]
    return sum(
        float((merged[k] - sum(w[k] for w in inputs) / len(inputs)).norm()) / float(merged[k].norm())
        for k in matrices
    ) / len(matrices)
