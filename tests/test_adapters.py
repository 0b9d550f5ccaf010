"""merge-adapters: the core-space solve equals the dense LoRE solve; PEFT round trip; bad inputs.

Expectations come from the dense ``lore_merge`` (float64 and float32) on the adapters
applied to the base, with the merged-in weights produced by PEFT's own ``merge_and_unload``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from mergekit_lore.adapters import merge_adapters  # noqa: E402
from mergekit_lore.cli import main  # noqa: E402
from mergekit_lore.core_space import core_space, merge_lora_module  # noqa: E402
from mergekit_lore.lore import THRESHOLD_RTOL, LoreConfig, lore_merge, resolve_thresholds  # noqa: E402
from mergekit_lore.params import LoreParameterError  # noqa: E402
from mergekit_lore.solver import SolveOptions  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(n, *, mode="anchor", mu=None, ratio=0.2, scale=0.5, combine="sum", weights=None) -> LoreConfig:
    return LoreConfig(mu=[mu] * n, mu_ratio=[ratio] * n, weights=weights or [1.0] * n,
                      densities=[1.0] * n, scale=scale, combine=combine, base_mode=mode, base_weight=1.0,
                      solve=SolveOptions())


def _factors(rows, cols, ranks, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, r, generator=generator, dtype=dtype) * 0.3,
             torch.randn(r, cols, generator=generator, dtype=dtype) * 0.3) for r in ranks]


def _dense(base, factors, config, has_base):
    thetas = [base + b @ a for b, a in factors]
    return lore_merge(thetas, config, base=base if has_base else None, trim=None, sign_consensus=None)


# ----------------------------------------------------------------------------- core-space math

@pytest.mark.parametrize("mode,has_base", [("anchor", True), ("fixed", True), ("init", True), ("anchor", False)])
@pytest.mark.parametrize("ranks", [(4, 8, 6), (5, 5), (3, 7, 2, 6)])
def test_core_space_equals_dense_float64(mode, has_base, ranks):
    base = torch.randn(40, 56, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factors = _factors(40, 56, ranks)
    # absolute thresholds: the same mu on both sides, so only the solve is compared
    config = _config(len(ranks), mode=mode, mu=1.5)
    merge = merge_lora_module(factors, config, has_base=has_base)
    expected = _dense(base, factors, config, has_base) - base
    assert merge.rank <= sum(ranks)
    torch.testing.assert_close(merge.b @ merge.a, expected, rtol=0, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("has_base", [True, False])
def test_core_space_relative_thresholds_match_dense(has_base):
    base = torch.randn(48, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    factors = _factors(48, 40, (6, 4, 8), seed=3)
    config = _config(3, ratio=0.2, combine="average", scale=1.3)
    merge = merge_lora_module(factors, config, has_base=has_base)
    deltas = [b @ a for b, a in factors]
    reference = torch.zeros_like(base) if has_base else torch.stack(deltas).mean(0)
    expected_mu = [0.2 * float(torch.linalg.matrix_norm(d - reference, ord=2)) for d in deltas]
    assert merge.thresholds == pytest.approx(expected_mu, rel=1e-12)
    # The dense path estimates s_1 by subspace iteration, to THRESHOLD_RTOL.
    thetas = [base + d for d in deltas]
    estimated = resolve_thresholds(thetas, base if has_base else torch.stack(thetas).mean(0), [None] * 3, [0.2] * 3)
    assert estimated == pytest.approx(expected_mu, rel=THRESHOLD_RTOL)
    # With the same (exact) thresholds the two solves are the same problem.
    exact = LoreConfig(mu=expected_mu, mu_ratio=config.mu_ratio, weights=config.weights, densities=config.densities,
                       scale=config.scale, combine=config.combine, base_mode=config.base_mode, base_weight=1.0,
                       solve=config.solve)
    expected = _dense(base, factors, exact, has_base) - base
    torch.testing.assert_close(merge.b @ merge.a, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_core_space_float32_dense_reference():
    """Against the dense solve in float32 (what mergekit-yaml runs): within that solve's own round-off.

    The float32 dense solve differs from the float64 one by ~2e-5 here (cancellation in
    ``W + B A - W`` and in the iteration); the core solve is at float64 precision.
    """
    base = torch.randn(64, 96, generator=torch.Generator().manual_seed(4))
    factors = _factors(64, 96, (8, 8, 8), seed=5, dtype=torch.float32)
    config = _config(3)
    merge = merge_lora_module(factors, config)
    dense32 = (_dense(base, factors, config, True) - base).double()
    exact = _dense(base.double(), [(b.double(), a.double()) for b, a in factors], config, True) - base.double()
    relative = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    assert relative(merge.b @ merge.a, exact) < 1e-10
    assert relative(merge.b @ merge.a, dense32) <= 1.5 * relative(dense32, exact) + 1e-6


def test_cores_are_exact_embeddings():
    factors = _factors(30, 20, (3, 5))
    space = core_space(factors)
    eye_left = space.left.T @ space.left
    torch.testing.assert_close(eye_left, torch.eye(eye_left.shape[0], dtype=torch.float64))
    for (b, a), core in zip(factors, space.cores):
        torch.testing.assert_close(space.embed(core), b @ a)
        assert torch.linalg.matrix_norm(core, ord="nuc") == pytest.approx(
            float(torch.linalg.matrix_norm(b @ a, ord="nuc")), rel=1e-10)


def test_rank_cap_is_best_approximation():
    base = torch.zeros(50, 60, dtype=torch.float64)
    factors = _factors(50, 60, (6, 6, 6), seed=6)
    config = _config(3)
    full = merge_lora_module(factors, config).b
    capped = merge_lora_module(factors, config, rank=5)
    update = _dense(base, factors, config, True)
    u, s, vh = torch.linalg.svd(update)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert capped.rank == 5 and full.shape[1] > 5
    torch.testing.assert_close(capped.b @ capped.a, best, rtol=0, atol=1e-9)
    assert capped.truncation_error == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-8)


def test_ties_is_rejected_in_core_space():
    with pytest.raises(ValueError, match="ties"):
        merge_lora_module(_factors(10, 12, (2, 2)), _config(2, combine="ties"))


# ----------------------------------------------------------------------------- PEFT adapters

def _tiny_llama(path: Path, seed=0, hidden=32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


def _load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    options.update(lora)
    model = peft.get_peft_model(_load(base), peft.LoraConfig(**options))
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            parameter.data.normal_(0, 0.05)  # PEFT may zero B; we want real task vectors
    model.save_pretrained(out)
    return out


def _merged_in(base: Path, adapter: Path) -> dict:
    model = peft.PeftModel.from_pretrained(_load(base), str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = _tiny_llama(root / "base")
    adapters = [
        _adapter(base, root / "a1", 1, r=4, lora_alpha=8),
        _adapter(base, root / "a2", 2, r=8, lora_alpha=4, use_rslora=True),
        _adapter(base, root / "a3", 3, r=6, lora_alpha=12, target_modules=["q_proj", "o_proj", "embed_tokens"],
                 rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"o_proj": 3}),
    ]
    return root, base, adapters


def _expected(base: Path, adapters, config: LoreConfig, has_base=True, dtype=torch.float64) -> dict:
    """Dense lore on the merged-in weights, for every weight any adapter changes."""
    base_state = _load(base).state_dict()
    merged_in = [_merged_in(base, a) for a in adapters]
    expected = {}
    for name, weight in base_state.items():
        thetas = [m[name].to(dtype) for m in merged_in]
        if weight.ndim != 2 or all(torch.equal(t, weight.to(dtype)) for t in thetas):
            continue
        expected[name] = lore_merge(thetas, config, base=weight.to(dtype) if has_base else None,
                                    trim=None, sign_consensus=None)
    return expected


def _assert_weights(actual_state: dict, expected: dict, base_state: dict, rtol=2e-5):
    for name, weight in expected.items():
        update = weight.double() - base_state[name].double()
        got = actual_state[name].double() - base_state[name].double()
        error = float((got - update).norm() / update.norm())
        assert error < rtol, f"{name}: relative error {error:.3g}"
    for name, weight in base_state.items():  # everything else untouched
        if name not in expected:
            torch.testing.assert_close(actual_state[name], weight)


@pytest.mark.parametrize("mode", ["anchor", "fixed", "none"])
def test_round_trip_through_peft(family, tmp_path, mode):
    root, base, adapters = family
    out = tmp_path / "merged_adapter"
    result = merge_adapters(base, adapters, out, parameters={"base_mode": mode})
    config = _config(3, mode="anchor" if mode == "none" else mode)
    expected = _expected(base, adapters, config, has_base=mode != "none")
    base_state = _load(base).state_dict()
    loaded = peft.PeftModel.from_pretrained(_load(base), str(out))
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter_logits = loaded(tokens).logits
    _assert_weights(loaded.merge_and_unload().state_dict(), expected, base_state)
    reference = _load(base)
    reference.load_state_dict({**base_state, **{k: v.float() for k, v in expected.items()}})
    with torch.no_grad():
        torch.testing.assert_close(adapter_logits, reference(tokens).logits, rtol=1e-4, atol=1e-5)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["use_rslora"] is False and saved["lora_alpha"] == saved["r"]
    assert saved["alpha_pattern"] == saved["rank_pattern"]
    assert "model.embed_tokens" in saved["target_modules"]
    assert result.missing["a1"] and result.missing["a2"]  # union of targets: a3's modules


def test_merged_model_and_rank_cap_cli(family, tmp_path):
    root, base, adapters = family
    out = tmp_path / "full"
    run = CliRunner().invoke(main, ["merge-adapters", str(base), *map(str, adapters), str(out), "--merged",
                                    "--lambda", "0.7", "--mu-ratio", "0.1,0.2,0.3"])
    assert run.exit_code == 0, run.output
    config = LoreConfig(mu=[None] * 3, mu_ratio=[0.1, 0.2, 0.3], weights=[1.0] * 3, densities=[1.0] * 3,
                        scale=0.7, combine="sum", base_mode="anchor", base_weight=1.0, solve=SolveOptions())
    expected = _expected(base, adapters, config)
    _assert_weights(_load(out).state_dict(), expected, _load(base).state_dict())

    capped = tmp_path / "capped"
    run = CliRunner().invoke(main, ["merge-adapters", str(base), *map(str, adapters), str(capped), "--rank", "3"])
    assert run.exit_code == 0, run.output
    assert "truncation error" in run.output
    saved = json.loads((capped / "adapter_config.json").read_text())
    assert max([saved["r"], *saved["rank_pattern"].values()]) <= 3
    report = json.loads((capped / "lore_adapters.json").read_text())
    assert max(m["full_rank"] for m in report["modules"].values()) > 3


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2 Conv1D weights are stored in x out: PEFT's fan_in_fan_out layout round-trips."""
    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).save_pretrained(base)
    adapters = [_adapter(base, tmp_path / f"g{i}", 10 + i, r=r, target_modules=["c_attn", "c_proj"],
                         fan_in_fan_out=True, task_type=None) for i, r in enumerate((3, 5, 4))]
    out = tmp_path / "merged"
    merge_adapters(base, adapters, out)
    expected = _expected(base, adapters, _config(3))
    assert any("c_attn" in name for name in expected)
    loaded = peft.PeftModel.from_pretrained(_load(base), str(out)).merge_and_unload()
    _assert_weights(loaded.state_dict(), expected, _load(base).state_dict())


# ----------------------------------------------------------------------------- bad input

def test_rejects_dora(family, tmp_path):
    root, base, adapters = family
    dora = _adapter(base, tmp_path / "dora", 4, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        merge_adapters(base, [adapters[0], dora], tmp_path / "out")


def test_rejects_modules_to_save(family, tmp_path):
    root, base, adapters = family
    saved = _adapter(base, tmp_path / "mts", 5, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save"):
        merge_adapters(base, [adapters[0], saved], tmp_path / "out")


def test_rejects_other_tuner_types(family, tmp_path):
    root, base, adapters = family
    model = peft.get_peft_model(_load(base), peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="not LoRA"):
        merge_adapters(base, [adapters[0], tmp_path / "ia3"], tmp_path / "out")


def test_rejects_other_base_model(family, tmp_path):
    root, base, adapters = family
    other = _tiny_llama(tmp_path / "other_base", seed=9)
    foreign = _adapter(other, tmp_path / "foreign", 6)
    with pytest.raises(ValueError, match="different base models"):
        merge_adapters(base, [adapters[0], foreign], tmp_path / "out")
    with pytest.raises(ValueError, match="trained on"):
        merge_adapters(base, [foreign], tmp_path / "out")


def test_rejects_shape_mismatch(family, tmp_path):
    root, base, adapters = family
    wide = _tiny_llama(tmp_path / "wide", hidden=48)
    adapter = _adapter(wide, tmp_path / "wide_adapter", 7)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base)  # claims the right base, shapes say otherwise
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong base model"):
        merge_adapters(base, [adapters[0], adapter], tmp_path / "out")


def test_rejects_ties_and_bad_parameters(family, tmp_path):
    root, base, adapters = family
    with pytest.raises(ValueError, match="ties"):
        merge_adapters(base, adapters, tmp_path / "out", parameters={"combine": "ties"})
    with pytest.raises(LoreParameterError, match="'mu_ratio' must be one value or one per input"):
        merge_adapters(base, adapters, tmp_path / "out", parameters={"mu_ratio": [0.1, 0.2]})
    with pytest.raises(LoreParameterError, match="did you mean 'lambda'"):
        merge_adapters(base, adapters, tmp_path / "out", parameters={"lamda": 0.7})
    run = CliRunner().invoke(main, ["merge-adapters", str(base), str(adapters[0]), str(tmp_path / "o"),
                                    "--combine", "ties"])
    assert run.exit_code != 0 and "ties" in run.output


def test_refuses_non_empty_output(family, tmp_path):
    root, base, adapters = family
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="force"):
        merge_adapters(base, adapters, tmp_path / "busy")
