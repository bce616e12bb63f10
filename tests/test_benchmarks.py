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
