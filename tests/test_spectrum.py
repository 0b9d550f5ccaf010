"""``mergekit-lore spectrum``: singular value decay of task vectors (the paper's Figure 1)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mergekit_lore import demo
from mergekit_lore.cli import main
from mergekit_lore.spectrum import gram_singular_values, plot_spectrum, task_vector_spectra

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ``family`` (tests/conftest.py): a tiny 2-layer Llama base + 3 variants, each matrix
# the base plus a planted rank-4 update and dense noise at 2% of the weight RMS.


def test_gram_singular_values_match_svd():
    torch.manual_seed(0)
    for shape in [(30, 50), (50, 30), (1, 7)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(
            gram_singular_values(x), torch.linalg.svdvals(x.double()), rtol=1e-6, atol=1e-6
        )


def test_spectrum_cli_writes_png(family, tmp_path):
    config = tmp_path / "lore.yml"
    config.write_text(demo.lore_config_yaml(family.models, base=family.base))
    png, data = tmp_path / "fig.png", tmp_path / "fig.json"
    result = CliRunner().invoke(
        main,
        ["spectrum", str(config), "--out", str(png), "--data", str(data),
         "--layers", "*layers.0.self_attn.q_proj*", "--layers", "re:layers\\.1\\.mlp\\.down_proj"],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC
    spectra = json.loads(data.read_text())
    assert spectra["tensors"] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert spectra["reference"].startswith("reference: base model")
    for tensor in spectra["tensors"]:
        for model in spectra["models"]:
            s = spectra["singular_values"][tensor][model]
            assert len(s) == 64
            # task vector = planted rank-4 update + small noise: sharp drop after index 4
            assert s[4] / s[0] < 0.1 < s[3] / s[0]
    assert "rank for 90% energy" in result.output


def test_spectrum_default_selection_mean_reference(family, tmp_path):
    config = demo.lore_config_yaml(family.models[:2])  # no base: reference is the mean
    spectra = task_vector_spectra(config)
    assert spectra.reference_label == "reference: mean of the models"
    assert spectra.tensors and all(".layers.1." in t for t in spectra.tensors)  # the middle layer
    assert len(spectra.tensors) == 7
    # two models and the mean: the task vectors are exact negatives, same spectrum
    a, b = (spectra.values[spectra.tensors[0]][m] for m in spectra.models)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    out = plot_spectrum(spectra, tmp_path / "default.png", top=10, normalize=False)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_spectrum_rejects_unknown_layers(family, tmp_path):
    config = tmp_path / "lore.yml"
    config.write_text(demo.lore_config_yaml(family.models))
    result = CliRunner().invoke(
        main, ["spectrum", str(config), "--out", str(tmp_path / "x.png"), "--layers", "nothing.*"]
    )
    assert result.exit_code != 0 and "no 2-D weight matches" in result.output


def test_fine_tune_like_shared_fraction_sets_the_task_vector_cosine():
    from mergekit_lore.demo import fine_tune_like

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(400, 300, generator=g) * 0.02}
    for shared in (0.0, 0.55):
        a, b = (fine_tune_like(base, seed, rank=16, strength=0.05, noise=0.0, shared=shared)["w"] - base["w"]
                for seed in (1, 2))
        cosine = float((a * b).sum() / (a.norm() * b.norm()))
        assert cosine == pytest.approx(shared, abs=0.05)
