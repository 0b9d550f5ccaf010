"""Reversible export: OUT/base (theta_0) + one PEFT LoRA adapter per source model.

Round trips on tiny local Llama models: loading the base with transformers and an
adapter with peft (offline) must give back the solver's theta_0 + delta_i, captured
from the same run through the report hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergekit_lore import demo
from mergekit_lore.cli import main
from mergekit_lore.export import MANIFEST_FILE, RESIDUAL_FILE, export_lore, load_source_model, split_factors
from mergekit_lore.observers import capture_solves
from mergekit_lore.svt import LowRank

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


class Expected:
    """theta_0 and theta_0 + delta_i per tensor, captured from the solve."""

    def __init__(self):
        self.theta0 = {}
        self.models = {}

    def __call__(self, solve, models):
        self.theta0[solve.label] = solve.theta0.detach().clone()
        for model, delta in zip(models, solve.deltas):
            dense = delta.dense() if isinstance(delta, LowRank) else delta
            self.models.setdefault(model, {})[solve.label] = (solve.theta0 + dense).detach().clone()


def _weights(path: Path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = float(expected.abs().max()) or 1.0
    error = float((actual.float() - expected.float()).abs().max())
    assert error <= 2e-6 * scale + 1e-7, f"{name}: max error {error:.3g} (scale {scale:.3g})"


def _relative_distance(state: dict, source: dict) -> float:
    num = sum(float((state[k].double() - source[k].double()).pow(2).sum()) for k in source)
    den = sum(float(source[k].double().pow(2).sum()) for k in source)
    return (num / den) ** 0.5


def test_split_factors_is_exact_and_balanced():
    torch.manual_seed(0)
    delta = LowRank(torch.randn(30, 5), torch.randn(20, 5)).scaled(-2.0)
    b, a = split_factors(delta)
    assert b.shape == (30, 5) and a.shape == (5, 20)
    torch.testing.assert_close(b @ a, delta.dense(), rtol=1e-5, atol=1e-5)
    # B = U sqrt(S), A = sqrt(S) V^T: B^T B == A A^T == diag(S)
    torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-4, atol=1e-4)
    empty_b, empty_a = split_factors(LowRank.zeros(4, 3, dtype=torch.float32, device=torch.device("cpu")))
    assert empty_b.shape == (4, 0) and empty_a.shape == (0, 3)


def test_export_cli_round_trip(family, tmp_path):
    """``family``: the session's tiny Llama base + 3 variants (tests/conftest.py)."""
    models = family.models
    config = tmp_path / "lore.yml"
    config.write_text(demo.lore_config_yaml(models, parameters={"max_iter": 2}))
    out = tmp_path / "export"
    expected = Expected()
    with capture_solves(expected):
        result = CliRunner().invoke(main, ["export", str(config), str(out), "--merged", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "storage:" in result.output

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [m["name"] for m in manifest["models"]] == [str(m) for m in models]
    assert manifest["storage"]["ratio"] < 1.0
    assert (out / "merged" / "model.safetensors").exists()
    assert len((out / "lore_report.jsonl").read_text().splitlines()) == len(expected.theta0)
    assert (out / "lore_report.summary.txt").read_text().startswith("lore report:")

    # OUT/base is theta_0 and loads with transformers.
    base_weights = _weights(out / "base")
    for name, theta0 in expected.theta0.items():
        _assert_close(base_weights[name], theta0, name)
    LlamaForCausalLM.from_pretrained(str(out / "base"))

    for entry, source_dir in zip(manifest["models"], models):
        adapter = out / entry["adapter"]
        assert entry["residual"] == [] and not (adapter / RESIDUAL_FILE).exists()
        adapter_config = json.loads((adapter / "adapter_config.json").read_text())
        assert adapter_config["lora_alpha"] == adapter_config["r"]
        assert adapter_config["alpha_pattern"] == adapter_config["rank_pattern"]
        assert len(entry["modules_to_save"]) == 5  # 2 x 2 layer norms + final norm

        base = LlamaForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        state = {k: v.detach() for k, v in merged.state_dict().items()}
        for name, value in expected.models[entry["name"]].items():
            _assert_close(state[name], value, f"{entry['name']}: {name}")

        # Distance to the original source model = the solve's residual.
        source = _weights(source_dir)
        distance = _relative_distance(state, source)
        print(f"{Path(entry['name']).name}: relative distance to the source model {distance:.4g}")
        assert distance == pytest.approx(entry["relative_reconstruction_error"], rel=1e-3)
        assert distance < 0.1
        # and much closer to its own source than theta_0 is
        assert distance < 0.5 * _relative_distance(base_weights, source)


def _tied_bias_family(root: Path):
    """1-layer Qwen2 (q/k/v biases, tied embeddings): base + 2 variants."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = demo.TinyLlamaShape(layers=1)
    config = demo.llama_config(shape, Qwen2Config, tie_word_embeddings=True)
    torch.manual_seed(7)
    base_state = {k: v for k, v in Qwen2ForCausalLM(config).state_dict().items() if k != "lm_head.weight"}

    def save(path: Path, state: dict) -> Path:
        model = Qwen2ForCausalLM(config)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        model.save_pretrained(str(path))
        demo.save_tokenizer(path, shape.vocab)
        return path.resolve()

    base = save(root / "base", base_state)
    models = [save(root / f"model_{i}", demo.fine_tune_like(base_state, 50 + i)) for i in range(2)]
    return base, models


def test_export_biases_tied_embeddings_and_base(tmp_path):
    base_dir, models = _tied_bias_family(tmp_path / "models")
    config = demo.lore_config_yaml(models, base=base_dir, parameters={"base_mode": "fixed", "mu_ratio": 0.05})
    out = tmp_path / "export"
    expected = Expected()
    with capture_solves(expected):
        result = export_lore(config, out)
    print(result.storage_line())

    # base_mode: fixed pins theta_0 to the base model.
    base_weights, given_base = _weights(out / "base"), _weights(base_dir)
    for name, value in given_base.items():
        _assert_close(base_weights[name], value, name)

    ids = torch.tensor([[1, 5, 9, 20, 3, 7]])
    for info, source_dir in zip(result.adapters.values(), models):
        adapter_config = json.loads((info.path / "adapter_config.json").read_text())
        assert adapter_config["bias"] == "lora_only"
        assert adapter_config["ensure_weight_tying"] is True
        assert "lm_head" not in adapter_config["target_modules"]
        assert set(info.biases) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
        assert info.residual == []

        want = expected.models[info.name]
        merged = load_source_model(out, info.name)
        state = merged.state_dict()
        for name, value in want.items():
            _assert_close(state[name], value, f"{info.name}: {name}")
        # The tied output layer sees the same task vector as the embedding (merged once).
        _assert_close(merged.lm_head.weight.detach(), want["model.embed_tokens.weight"], "lm_head")

        # Unmerged PEFT forward == a model holding theta_0 + delta_i.
        reference = Qwen2ForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
        reference.load_state_dict({**reference.state_dict(), **want}, strict=False)
        peft_model = PeftModel.from_pretrained(
            Qwen2ForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32), str(info.path)
        )
        with torch.no_grad():
            torch.testing.assert_close(peft_model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        assert info.relative_error is not None and info.relative_error < 0.1


def test_export_refuses_other_methods(family, tmp_path):
    config = demo.lore_config_yaml(family.models[:2], method="linear")
    with pytest.raises(ValueError, match="merge_method: lore"):
        export_lore(config, tmp_path / "out")


def test_export_moe_experts_as_parameter_lora(tmp_path):
    """Fused 3-D expert stacks (solved per slice) and the router become LoRA on parameters."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(5)
    base_state = MixtralForCausalLM(config).state_dict()

    def save(path: Path, state: dict) -> Path:
        model = MixtralForCausalLM(config)
        model.load_state_dict(state)
        model.save_pretrained(str(path))
        demo.save_tokenizer(path, config.vocab_size)
        return path.resolve()

    root = tmp_path / "models"
    base_dir = save(root / "base", base_state)
    models = [save(root / f"m{i}", demo.fine_tune_like(base_state, 70 + i)) for i in range(2)]
    out = tmp_path / "export"
    expected = Expected()
    with capture_solves(expected):
        result = export_lore(
            demo.lore_config_yaml(models, base=base_dir, parameters={"base_mode": "fixed", "mu_ratio": 0.2}), out
        )
    experts = "model.layers.0.mlp.experts"
    assert f"{experts}.gate_up_proj[1]" in expected.theta0  # solved slice by slice

    ids = torch.tensor([[1, 5, 9, 20, 3]])
    for info in result.adapters.values():
        assert info.residual == []
        assert set(info.parameters) == {f"{experts}.gate_up_proj", f"{experts}.down_proj", "model.layers.0.mlp.gate.weight"}
        merged = load_source_model(out, info.name)
        state = merged.state_dict()
        for label, value in expected.models[info.name].items():
            name, _, index = label.partition("[")
            actual = state[name][int(index[:-1])] if index else state[name]
            _assert_close(actual, value, f"{info.name}: {label}")
        peft_model = PeftModel.from_pretrained(
            MixtralForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32), str(info.path)
        )
        with torch.no_grad():
            torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
        # the checkpoint stores experts one by one; transformers fuses them on load
        source = MixtralForCausalLM.from_pretrained(info.name, dtype=torch.float32).state_dict()
        assert _relative_distance(state, source) == pytest.approx(info.relative_error, rel=1e-3)


class InterruptAfter:
    """Observer that raises ``KeyboardInterrupt`` at the ``count``-th solve (Ctrl-C mid-merge)."""

    def __init__(self, count: int):
        self.count = count
        self.seen = 0

    def __call__(self, solve, models):
        self.seen += 1
        if self.seen >= self.count:
            raise KeyboardInterrupt


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_interrupted_export_leaves_out_untouched(family, tmp_path):
    """Ctrl-C in the middle of the merge: no OUT (or the previous one, byte for byte) and no temp dir."""
    config = demo.lore_config_yaml(family.models, parameters={"max_iter": 2})
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "export"
    interrupt = InterruptAfter(5)
    with pytest.raises(KeyboardInterrupt), capture_solves(interrupt):
        export_lore(config, out)
    assert interrupt.seen == 5
    assert not out.exists() and _siblings(out) == []

    # A previous export (and a file of the user's) in OUT, replaced with --force.
    (out / "base").mkdir(parents=True)
    (out / "base" / "model.safetensors").write_bytes(b"previous export")
    (out / MANIFEST_FILE).write_text("{}\n")
    (out / "notes.txt").write_text("mine\n")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="--force"):
        export_lore(config, out)
    with capture_solves(InterruptAfter(5)):
        result = CliRunner().invoke(main, ["export", str(config_file(tmp_path, config)), str(out), "--force"])
    assert result.exit_code != 0 and isinstance(result.exception, (KeyboardInterrupt, SystemExit))
    assert _snapshot(out) == before and _siblings(out) == []

    # Not interrupted: the export replaces the previous one, the user's file stays.
    result = export_lore(config, out, force=True)
    assert _siblings(out) == []
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "base" / "model.safetensors").read_bytes() != b"previous export"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [m["name"] for m in manifest["models"]] == [str(m) for m in family.models]
    for info in result.adapters.values():
        assert info.path.parent.parent == out and info.path.is_dir()
        adapter_config = json.loads((info.path / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(out / "base")


def config_file(root: Path, text: str) -> Path:
    path = root / "lore.yml"
    path.write_text(text)
    return path
