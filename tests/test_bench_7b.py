"""``bench/bench_7b.py`` multiplies one merge per matrix shape by how many matrices of that shape
the model has: those counts must be the real architecture's, read from transformers' own model
built (on the meta device, no memory) from the published configs."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_7b import model_shapes  # noqa: E402

# config.json of Qwen/Qwen2.5-7B and meta-llama/Meta-Llama-3-8B (the fields that set the shapes)
PUBLISHED = {
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, num_hidden_layers=28, tie_word_embeddings=False), 7_615_616_512),
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, num_hidden_layers=32, tie_word_embeddings=False), 8_030_261_248),
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_shape_counts_are_the_architectures_matrices(arch):
    import transformers

    config_name, model_name, fields, parameters = PUBLISHED[arch]
    with torch.device("meta"):
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields))
    assert sum(p.numel() for p in model.parameters()) == parameters  # the published size
    matrices = Counter(tuple(p.shape) for p in model.parameters() if p.ndim == 2)
    counted = Counter()
    for shape, count in model_shapes(arch).values():
        counted[shape] += count
    assert counted == matrices
