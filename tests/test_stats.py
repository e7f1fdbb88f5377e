"""`mergelang stats` and the `check` warning about DARE on large deltas, against plain torch."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergelang.api import RunOptions, check
from mergelang.cli import main
from mergelang.demo import make_tiny_llama
from mergelang.diagnostics import DARE_LARGE_DELTA, MergelangError, Reporter
from mergelang.stats import (
    LARGE_DELTA, QUANTILES, SAFE_DELTA, delta_stats, level, tensor_kind, verdict,
)

from conftest import write_spec

# ---- hand-built checkpoints with known deltas ---------------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


ORDER = [UP0, Q0, UP1, Q1, EMBED, NORM]  # layers in order, each layer's tensors by name, then the rest


def _deltas() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        Q0: torch.linspace(-0.01, 0.02, 30).reshape(6, 5),
        # ties, zeros and a -0.0: order statistics that repeat
        Q1: torch.tensor([[0.0, -0.0, 0.001, 0.001, -0.001], [0.003, 0.003, -0.003, 0.0, 0.5]]),
        UP0: torch.randn(300, 70, generator=gen) * 0.004,  # 21000 entries: several radix bins per quantile
        UP1: torch.randn(40, 7, generator=gen) * 0.03,
        EMBED: torch.randn(10, 4, generator=gen) * 0.002,  # the common rows; the fine-tune has 12
        NORM: torch.tensor([0.25, -0.125, 0.0, 0.0625]),
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """base/ and ft/ whose delta is exactly _deltas() (in float32); the fine-tune's embedding has two
    extra rows. Returns the folders and the deltas as stored (ft - base in float32)."""
    root = tmp_path_factory.mktemp("pair")
    gen = torch.Generator().manual_seed(1)
    deltas = _deltas()
    base = {name: torch.randn(d.shape, generator=gen) * 0.02 for name, d in deltas.items()}
    ft = {name: base[name] + d for name, d in deltas.items()}
    ft[EMBED] = torch.cat([ft[EMBED], torch.ones(2, 4)])
    for name, weights in (("base", base), ("ft", ft)):
        (root / name).mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(root / name / "model.safetensors"))
    stored = {name: ft[name][: base[name].shape[0]] - base[name] for name in deltas}
    return root / "ft", root / "base", stored


def _reference(d: torch.Tensor) -> dict:
    a = d.reshape(-1).to(torch.float64).abs()
    return {"min": float(d.min()), "max": float(d.max()), "mean_abs": float(a.mean()), "max_abs": float(a.max()),
            "quantiles": {q: float(torch.quantile(a, q)) for q in QUANTILES}, "count": d.numel()}


def _assert_stats(s, ref: dict, rel: float) -> None:
    assert s.count == ref["count"]
    assert (s.min, s.max, s.max_abs) == (ref["min"], ref["max"], ref["max_abs"])
    assert s.mean_abs == pytest.approx(ref["mean_abs"], rel=1e-12)
    for q in QUANTILES:
        assert s.quantiles[q] == pytest.approx(ref["quantiles"][q], rel=rel, abs=1e-30), q


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])  # one row at a time, a few rows, whole tensors
def test_tensor_statistics_are_exact(pair, chunk):
    ft, base, stored = pair
    report = delta_stats(ft, base, chunk=chunk)
    assert [t.name for t in report.tensors] == ORDER
    for t in report.tensors:
        assert t.stats.exact
        assert t.shape == tuple(stored[t.name].shape)
        _assert_stats(t.stats, _reference(stored[t.name]), rel=1e-12)


def test_hand_computed_quantiles(pair):
    """Q1's |δ| sorted: 0, 0, 0, 0.001 ×3, 0.003 ×3, 0.5 (n = 10); p50 sits at rank 4.5 → 0.001,
    p90 at rank 8.1 → 0.003 + 0.1·(0.5 − 0.003)."""
    ft, base, _ = pair
    s = next(t.stats for t in delta_stats(ft, base).tensors if t.name == Q1)
    # δ as stored is (base + δ) − base in float32: equal to the literals within a few float32 ulps of base
    assert s.quantiles[0.5] == pytest.approx(0.001, rel=1e-5)
    assert s.quantiles[0.9] == pytest.approx(0.003 + 0.1 * (0.5 - 0.003), rel=1e-5)
    assert s.max_abs == pytest.approx(0.5, rel=1e-5)


def test_aggregates_by_layer_kind_and_overall(pair):
    ft, base, stored = pair
    report = delta_stats(ft, base, chunk=64)
    groups = {
        ("layer", 0): [Q0, UP0], ("layer", 1): [Q1, UP1], ("layer", None): [EMBED, NORM],
        ("kind", "self_attn.q_proj"): [Q0, Q1], ("kind", "mlp.up_proj"): [UP0, UP1],
        ("kind", "embed_tokens"): [EMBED], ("kind", "norm"): [NORM],
    }
    assert list(report.by_layer) == [0, 1, None]
    assert list(report.by_kind) == ["mlp.up_proj", "self_attn.q_proj", "embed_tokens", "norm"]
    for (by, key), names in groups.items():
        s = (report.by_layer if by == "layer" else report.by_kind)[key]
        assert not s.exact
        _assert_stats(s, _reference(torch.cat([stored[n].reshape(-1) for n in names])), rel=2**-8)
    _assert_stats(report.overall, _reference(torch.cat([d.reshape(-1) for d in stored.values()])), rel=2**-8)


def test_tensor_kinds():
    assert tensor_kind("model.layers.3.mlp.up_proj.weight") == "mlp.up_proj"
    assert tensor_kind("model.layers.12.self_attn.q_proj.bias") == "self_attn.q_proj.bias"
    assert tensor_kind("model.embed_tokens.weight") == "embed_tokens"
    assert tensor_kind("model.norm.weight") == "norm"
    assert tensor_kind("lm_head.weight") == "lm_head"
    assert tensor_kind("transformer.h.0.attn.c_attn.weight") == "attn.c_attn"


def test_different_vocabularies_compare_common_rows(pair):
    ft, base, _ = pair
    report = delta_stats(ft, base)
    messages = [d.message for d in report.diagnostics]
    assert messages == [f"`{EMBED}`: vocabularies differ (12 rows in the fine-tuned model, 10 in the base): "
                        "only the 10 rows they have in common are compared"]


# ---- problems: missing, mismatched, non-float ----------------------------------------------------------


def test_missing_mismatched_and_integer_tensors_are_named(tmp_path):
    (tmp_path / "ft").mkdir()
    (tmp_path / "base").mkdir()
    save_file({"a.weight": torch.ones(2, 3), "b.weight": torch.ones(2, 3), "only_ft": torch.ones(2),
               "ids": torch.ones(3, dtype=torch.int64)}, str(tmp_path / "ft" / "model.safetensors"))
    save_file({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(3, 2), "only_base": torch.ones(2),
               "ids": torch.ones(3, dtype=torch.int64)}, str(tmp_path / "base" / "model.safetensors"))
    report = delta_stats(tmp_path / "ft", tmp_path / "base")
    assert [t.name for t in report.tensors] == ["a.weight"]
    got = sorted((d.code, d.message) for d in report.diagnostics)
    assert got == sorted([
        ("E008", f"the base model {tmp_path / 'base'} has no tensor `only_ft`; not compared"),
        ("E008", f"the fine-tuned model {tmp_path / 'ft'} has no tensor `only_base`; not compared"),
        ("E009", "`b.weight`: shape [2, 3] in the fine-tuned model, [3, 2] in the base; not compared"),
        ("E011", "`ids`: stored as I64 in the fine-tuned model, not floating point; not compared"),
    ])
    assert all(d.severity == "warning" for d in report.diagnostics)


def test_nothing_comparable_and_missing_folder_are_errors(tmp_path):
    (tmp_path / "ft").mkdir()
    (tmp_path / "base").mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "ft" / "model.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(MergelangError) as e:
        delta_stats(tmp_path / "ft", tmp_path / "base")
    assert e.value.diagnostics[-1].message == (f"no tensor of {tmp_path / 'ft'} could be compared with "
                                               f"{tmp_path / 'base'}")
    with pytest.raises(MergelangError) as e:
        delta_stats(tmp_path / "nope", tmp_path / "base")
    assert e.value.diagnostics[0].code == "E007"
    assert e.value.diagnostics[0].message == f"the fine-tuned model: {tmp_path / 'nope'}: checkpoint folder not found"


# ---- verdicts -------------------------------------------------------------------------------------------


def test_verdict_thresholds():
    assert [level(x) for x in (0.0, 0.004, SAFE_DELTA, 0.0051, 0.02, 0.0299, LARGE_DELTA, 0.5, float("nan"))] == [
        "small", "small", "small", "moderate", "moderate", "moderate", "large", "large", "large"]
    assert verdict(0.004) == ("deltas are small (p99 |δ| = 0.004 ≤ 0.005, typical of fine-tuning): "
                              "DARE p up to 0.9–0.99 is safe")
    assert verdict(0.05) == ("deltas are large (p99 |δ| = 0.05 ≥ 0.03; continued pre-training?): "
                             "DARE will likely hurt; use p ≤ 0.5 or do not drop")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> Path:
    """float32 tiny Llamas: base/, and fine-tunes of it with δ ~ N(0, σ): small/ (σ = 0.0015, p99 |δ|
    ≈ 0.0039), mid/ (σ = 0.006) and large/ (σ = 0.03, p99 ≈ 0.077)."""
    root = tmp_path_factory.mktemp("llamas")
    make_tiny_llama(root / "base", seed=0, dtype=torch.float32)
    for name, seed, std in (("small", 1, 0.0015), ("mid", 2, 0.006), ("large", 3, 0.03)):
        make_tiny_llama(root / name, seed=seed, base=root / "base", delta_std=std, dtype=torch.float32)
    return root


@pytest.mark.parametrize("name, expected", [("small", "small"), ("mid", "moderate"), ("large", "large")])
def test_verdict_of_gaussian_deltas(llamas, name, expected):
    report = delta_stats(llamas / name, llamas / "base")
    ft, base = load_file(str(llamas / name / "model.safetensors")), load_file(str(llamas / "base" / "model.safetensors"))
    everything = torch.cat([(ft[n] - base[n]).reshape(-1) for n in base]).abs().double()
    assert report.overall.p99 == pytest.approx(float(torch.quantile(everything, 0.99)), rel=2**-8)
    assert level(report.overall.p99) == expected
    assert report.verdict == verdict(report.overall.p99)


# ---- the command line -------------------------------------------------------------------------------------


def test_cli_table_rows_and_verdict_last(pair):
    ft, base, stored = pair
    report = delta_stats(ft, base)
    for by, labels in (("kind", ["mlp.up_proj", "self_attn.q_proj", "embed_tokens", "norm", "all"]),
                       ("layer", ["0", "1", "-", "all"]), ("tensor", [*ORDER, "all"])):
        result = CliRunner().invoke(main, ["stats", str(ft), str(base), "--by", by])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        rows = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
        assert rows == labels
        assert lines[-1] == f"verdict: {report.verdict}"
    all_row = next(line for line in lines if line.startswith("│ all "))
    cells = [c.strip() for c in all_row.split("│")[2:-1]]
    o = report.overall
    assert cells == [str(o.count), f"{o.min:.3g}", f"{o.max:.3g}", f"{o.mean_abs:.3g}",
                     *(f"{o.quantiles[q]:.3g}" for q in QUANTILES), f"{o.max_abs:.3g}", level(o.p99)]
    assert "vocabularies differ" in result.stderr


def test_cli_json(pair):
    ft, base, stored = pair
    result = CliRunner().invoke(main, ["stats", str(ft), str(base), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["tensors"]) == ORDER
    for name, d in stored.items():
        ref = _reference(d)
        got = data["tensors"][name]
        assert (got["min"], got["max"], got["count"]) == (ref["min"], ref["max"], ref["count"])
        assert got["quantiles_abs"]["0.99"] == pytest.approx(ref["quantiles"][0.99], rel=1e-12)
    assert data["verdict"] == delta_stats(ft, base).verdict
    assert list(data["by_layer"]) == ["0", "1", "-"]


def test_cli_plot_without_matplotlib(pair, monkeypatch, tmp_path):
    ft, base, _ = pair
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    result = CliRunner().invoke(main, ["stats", str(ft), str(base), "--plot", str(tmp_path / "d.png")])
    assert result.exit_code == 1
    assert "error[E031]: --plot needs matplotlib, which is not installed" in result.stderr
    assert "pip install 'mergelang[plot]'" in result.stderr
    assert not (tmp_path / "d.png").exists()


def test_cli_plot_writes_png(llamas, tmp_path):
    pytest.importorskip("matplotlib")
    from mergelang.stats_view import PLOT_DPI, PLOT_SIZE

    out = tmp_path / "delta.png"
    result = CliRunner().invoke(main, ["stats", str(llamas / "large"), str(llamas / "base"), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (int(PLOT_SIZE[0] * PLOT_DPI), int(PLOT_SIZE[1] * PLOT_DPI))


# ---- check: DARE with a high p on large deltas ----------------------------------------------------------------


def _warnings(llamas: Path, text: str) -> list:
    spec = write_spec(llamas, text, name="dare_check.ml")
    reporter = Reporter()
    check(spec, RunOptions(), reporter).close()
    return [d for d in reporter.warnings if d.code == DARE_LARGE_DELTA]


def test_check_warns_on_dare_with_high_p_over_large_deltas(llamas):
    found = _warnings(llamas, 'base = model("base")\nft = model("large")\noutput base + dare(ft - base, p=0.9)\n')
    assert len(found) == 1
    w = found[0]
    assert (w.code, w.severity, w.span.line, w.span.col) == ("E030", "warning", 3, 15)
    # the same fixed sample, measured independently: the first and middle row of every tensor (2 layers)
    ft, base = load_file(str(llamas / "large" / "model.safetensors")), load_file(str(llamas / "base" / "model.safetensors"))
    parts = []
    for n in base:
        d = (ft[n] - base[n]).reshape(base[n].shape[0], -1) if base[n].dim() > 1 else (ft[n] - base[n]).reshape(1, -1)
        parts += [d[r, :4096].abs() for r in sorted({0, d.shape[0] // 2})]
    sample = torch.cat(parts)
    p99 = float(torch.quantile(sample.double(), 0.99))
    assert w.message == (f"`dare` with p = 0.9 on `ft - base`, whose deltas are large: p99 |δ| ≈ {p99:.3g}, "
                         f"estimated from a sample of {sample.numel()} entries in {len(base)} tensors")
    assert w.notes == (verdict(p99),)


def test_check_warns_at_the_dare_ties_call(llamas):
    found = _warnings(llamas, 'base = model("base")\nft = model("large")\nsmall = model("small")\n'
                              "output dare_ties(base, [ft, small], weights=[0.5, 0.5], density=0.1)\n")
    assert [(w.span.line, w.span.col) for w in found] == [(4, 8)]
    assert found[0].message.startswith("a random drop with density 0.1 (p = 0.9) on `ft - base`, whose deltas "
                                       "are large: p99 |δ| ≈ ")


@pytest.mark.parametrize("text", [
    'base = model("base")\nft = model("small")\noutput base + dare(ft - base, p=0.9)\n',  # small deltas
    'base = model("base")\nft = model("large")\noutput base + dare(ft - base, p=0.3)\n',  # low p
    'base = model("base")\nft = model("large")\noutput dare_linear(base, [ft], weights=[1], density=0.7)\n',
    'base = model("base")\nft = model("large")\noutput base + dare(2 * (ft - base), p=0.9)\n',  # not load - load
])
def test_check_does_not_warn(llamas, text):
    assert _warnings(llamas, text) == []
