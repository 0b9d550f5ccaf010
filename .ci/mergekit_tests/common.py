"""Helpers that mergekit 0.1.5's own test suite imports as ``tests.common``.

The PyPI sdist of mergekit 0.1.5 ships ``tests/`` without ``tests/common.py`` and
``tests/__init__.py``. This module is written for mergekit-lore from the way those
tests call it (``make_picollama``, ``make_picogranite``, ``make_gpt2size``,
``make_picoLlaVa``, ``run_and_check_merge``); ``.ci/mergekit_suite.sh`` copies it into
the unpacked sdist. Only tiny randomly initialised models, built locally.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge


def _save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _llama_config(vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=2,
    )


def make_picollama(path, vocab_size: int = 64) -> str:
    """A two-layer Llama with hidden size 32."""
    return _save(LlamaForCausalLM(_llama_config(vocab_size)), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    """A two-layer Granite (Llama-like, with its own multipliers)."""
    config = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=2,
    )
    return _save(GraniteForCausalLM(config), path)


def make_gpt2size(path) -> str:
    """A GPT-2 with the real layer count (12) and a tiny width."""
    config = GPT2Config(n_embd=32, n_layer=12, n_head=4, vocab_size=64, n_positions=64)
    return _save(GPT2LMHeadModel(config), path)


def make_picoLlaVa(path) -> str:
    """A tiny LLaVA: CLIP vision tower, projector and a two-layer Llama."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    config = LlavaConfig(vision_config=vision, text_config=_llama_config(), image_token_index=3)
    return _save(LlavaForConditionalGeneration(config), path)


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    auto_arch: bool = False,
) -> None:
    """Run ``config`` into a temporary directory and check what a merge must leave.

    ``auto_arch`` is accepted for the suite's calls; mergekit 0.1.5 detects the
    architecture (also of LLaVA models) by itself.
    """
    del auto_arch
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        root = Path(out)
        assert (root / "config.json").is_file(), "the merge wrote no config.json"
        shards = sorted(root.glob("*.safetensors"))
        assert shards, "the merge wrote no safetensors"
        if check_nan:
            for shard in shards:
                for name, tensor in load_file(str(shard)).items():
                    assert not tensor.isnan().any(), f"NaN in merged tensor {name}"
        if validate is not None:
            validate(out)
