"""The benchmark runs (its quick variant, builtin:tiny) and reports every figure; no timing checks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIGURES = {
    "train_step", "text_encoder_calls", "train_peak_memory",
    "render_bs1", "render_bs1_denoise", "render_bs4", "render_bs4_denoise",
    "concept_size", "concept_size_fp16",
    "cli_help", "cli_ls", "cli_show",
    "error_bad_name", "error_steps_0", "error_unknown_concept",
}


def test_quick_benchmark_reports_every_figure(tmp_path):
    out, markdown = tmp_path / "quick.json", tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "STC_BENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--write-md", "--markdown", str(markdown)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    figures = {f["id"]: f for f in data["figures"]}
    assert set(figures) == FIGURES
    for fid, f in figures.items():
        for side in ("stc", "baseline"):
            value = f[side]["value"]
            assert isinstance(value, (int, float)) and math.isfinite(value), (fid, side, value)
        assert f["goal"]["kind"] in ("ratio_max", "delta_max", "value_max", "value_eq")
        assert isinstance(f["met"], bool)

    calls = figures["text_encoder_calls"]
    assert calls["stc"]["value"] == 1  # NeTI: one batched call per training step
    assert calls["baseline"]["value"] == 16  # the reference design: one call per UNet layer
    assert calls["details"]["textual_inversion_calls"] == 1
    for fid in ("train_step", "render_bs1", "render_bs4"):
        assert figures[fid]["flop_ratio"] > 1  # NeTI does more arithmetic than its baseline
    assert figures["concept_size"]["stc"]["value"] > figures["concept_size_fp16"]["stc"]["value"]

    meta = data["meta"]
    assert meta["model"] == "builtin:tiny" and meta["quick"] is True
    assert meta["machine"]["torch_threads"] >= 1 and meta["machine"]["cpu"]
    assert "goals met" in done.stdout
    text = markdown.read_text()
    assert "python -m benchmarks --quick" in text and "How to read it" in text and "| # | figure |" in text


def test_quick_benchmark_runs_the_sdxl_layout(tmp_path):
    """The sdxl architecture's code path at tiny scale: both text encoders on both sides, the
    reference design's one call per layer (11 for SDXL)."""
    out = tmp_path / "quick-sdxl.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--model", "builtin:tiny-sdxl", "--only", "train,render",
         "--no-bs4", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "STC_BENCH_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = {f["id"]: f for f in json.loads(out.read_text())["figures"]}
    assert set(figures) == {"train_step", "text_encoder_calls", "train_peak_memory", "render_bs1",
                            "render_bs1_denoise"}
    calls = figures["text_encoder_calls"]
    assert calls["stc"]["value"] == 1 and calls["baseline"]["value"] == 11
    assert {"text encoder", "text encoder 2"} <= set(figures["train_step"]["details"]["stc_flops"]["by_module"])
    assert "StableDiffusionXLPipeline" in figures["render_bs1"]["baseline_label"]


def test_the_reference_designs_bmm_attention_is_attention():
    """The reference side's bmm attention computes what SDPA computes (so the ratio against it
    measures kernels, not other math), with and without a scale and a mask, queries ≠ keys."""
    import torch

    from benchmarks.training import bmm_attention

    generator = torch.Generator().manual_seed(0)
    for queries, keys, scale in ((7, 7, None), (16, 77, None), (5, 9, 0.3)):
        q = torch.randn(2, 3, queries, 8, generator=generator)
        k, v = (torch.randn(2, 3, keys, 8, generator=generator) for _ in range(2))
        mask = torch.randn(2, 3, queries, keys, generator=generator)
        for attn_mask in (None, mask):
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            # two kernels summing in other orders: float32 rounding, ~1e-7 of values of order 1
            torch.testing.assert_close(bmm_attention(q, k, v, attn_mask=attn_mask, scale=scale), expected,
                                       rtol=1e-5, atol=1e-5)


def test_the_gpu_runs_precision_part_rehearses_on_the_cpu(tmp_path):
    """``python -m benchmarks.gpu --quick --device cpu``: the precision part trains the same
    batches in fp32 and bf16 and records every loss, finite, with bf16's distance from fp32."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--quick", "--device", "cpu", "--only", "precision",
         "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "STC_HOME": str(tmp_path / "home")}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "gpu-run.json").read_text())
    part = record["parts"]["precision"]
    assert set(part["losses"]) == {"fp32", "bf16"} and all(len(v) == 4 for v in part["losses"].values())
    assert part["finite"] == {"fp32": True, "bf16": True}
    assert 0 < part["relative_to_fp32"]["bf16"] < 0.05  # bf16 rounds (≠ 0), yet trains the same batches
