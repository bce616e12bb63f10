"""Figures as records; the table, the JSON file and BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from .measure import Samples

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks --write-md rewrites this part; the rest is kept -->"
END = "<!-- END GENERATED -->"


# --------------------------------------------------------------------------- records


def side(value) -> dict:
    """One side of a figure: repeated samples (median, min, max) or a single number."""
    if isinstance(value, Samples):
        data = value.to_dict()
        data["value"] = data["median"]
        return data
    return {"value": value}


def figure(fid: str, number: int, title: str, unit: str, stc, baseline, goal: dict, *, stc_label: str,
           baseline_label: str, dtype: str | None = None, flop_ratio: float | None = None,
           details: dict | None = None) -> dict:
    """A figure record; ``goal`` is {"kind": "ratio_max"|"delta_max"|"value_max"|"value_eq", "value": x}."""
    stc_side, base_side = side(stc), side(baseline)
    s, b = float(stc_side["value"]), float(base_side["value"])
    ratio = s / b if b else None
    delta = s - b
    cpu_ratio = cpu_delta = None
    if "cpu_median" in stc_side and "cpu_median" in base_side and base_side["cpu_median"] > 0:
        cpu_ratio = stc_side["cpu_median"] / base_side["cpu_median"]
        cpu_delta = stc_side["cpu_median"] - base_side["cpu_median"]
    kind, target = goal["kind"], goal["value"]
    met = {
        "ratio_max": ratio is not None and ratio <= target,
        "delta_max": delta <= target,
        "value_max": s <= target,
        "value_eq": s == target,
    }[kind]
    text = {"ratio_max": f"≤ {target:g}×", "delta_max": f"≤ +{target:g} {unit}", "value_max": f"≤ {_fmt(target, unit)}",
            "value_eq": f"= {_fmt(target, unit)}"}[kind]
    return {
        "id": fid, "figure": number, "title": title, "unit": unit, "dtype": dtype,
        "stc_label": stc_label, "baseline_label": baseline_label,
        "stc": stc_side, "baseline": base_side,
        "ratio": ratio, "delta": delta, "cpu_ratio": cpu_ratio, "cpu_delta": cpu_delta,
        "goal": {**goal, "text": text}, "met": bool(met),
        "flop_ratio": flop_ratio,
        "ratio_over_flop_ratio": (ratio / flop_ratio) if (ratio is not None and flop_ratio) else None,
        "details": details or {},
    }


# --------------------------------------------------------------------------- formatting


def _fmt(value, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "bytes":
        if abs(value) >= 1e9:
            return f"{value / 1e9:.2f} GB"
        if abs(value) >= 1e6:
            return f"{value / 1e6:.3f} MB"
        return f"{value / 1e3:.1f} kB"
    if unit == "calls":
        return f"{value:g}"
    return f"{value:g} {unit}"


def _spread(data: dict, unit: str) -> str:
    if "min" not in data:
        return ""
    return f"{_fmt(data['min'], unit)}–{_fmt(data['max'], unit)}"


def _name(record: dict) -> str:
    dtype = f" [{record['dtype']}]" if record.get("dtype") else ""
    return f"{record['title']}{dtype}"


def rows(records: list[dict]) -> list[list[str]]:
    table = []
    for r in records:
        unit = r["unit"]
        ratio = f"{r['ratio']:.3f}×" if r["ratio"] is not None else "–"
        if r["goal"]["kind"] == "delta_max":
            ratio += f" (+{r['delta']:.3f} s)" if r["delta"] >= 0 else f" ({r['delta']:.3f} s)"
        cpu = f"{r['cpu_ratio']:.3f}×" if r.get("cpu_ratio") else "–"
        if r.get("cpu_ratio") and r["goal"]["kind"] == "delta_max":
            cpu += f" (+{r['cpu_delta']:.3f} s)" if r["cpu_delta"] >= 0 else f" ({r['cpu_delta']:.3f} s)"
        flop = f"{r['flop_ratio']:.3f}×" if r.get("flop_ratio") else "–"
        over = f"{r['ratio_over_flop_ratio']:.3f}" if r.get("ratio_over_flop_ratio") else "–"
        spread = " / ".join(x for x in (_spread(r["stc"], unit), _spread(r["baseline"], unit)) if x) or "–"
        table.append([
            str(r["figure"]), _name(r), _fmt(r["stc"]["value"], unit), _fmt(r["baseline"]["value"], unit), ratio,
            r["goal"]["text"], "yes" if r["met"] else "**MISS**", cpu, flop, over, spread,
        ])
    return table


HEADER = ["#", "figure", "stc", "baseline", "ratio", "goal", "met", "CPU-time ratio", "FLOP floor", "ratio ÷ floor",
          "spread (min–max) stc / baseline"]


def text_table(records: list[dict]) -> str:
    table = [HEADER] + [[cell.replace("**", "") for cell in row] for row in rows(records)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(records)]
    return "\n".join(lines)


def sides_table(records: list[dict]) -> str:
    lines = ["| # | figure | stc side | baseline side |", "|---|---|---|---|"]
    seen = set()
    for r in records:
        key = (r["figure"], r["stc_label"], r["baseline_label"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['figure']} | {r['title']} | {r['stc_label']} | {r['baseline_label']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device,
    }
    for package in ("diffusers", "transformers", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # not installed
            info[package] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- files


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


HOW_TO_READ = """\
**How to read it.** Every row is measured in one process, in one run: the stc side and its
baseline alternate (stc first, then the baseline first, ...) after one warm-up each, so load on
the machine hits both alike. *ratio* = stc ÷ baseline (medians of the wall time; goals are
judged on it); *spread* is min–max over the repeats. *CPU-time ratio* is the same for the CPU
time of the process (all its threads; for CLI rows, of the subprocess): on a machine shared with
other work it moves far less than the wall time, so where the two disagree, trust it for the
cost of the code and the wall time for what a user waits. *FLOP floor* = stc's FLOPs ÷ the \
baseline's FLOPs for the same configuration, counted
with `torch.utils.flop_counter.FlopCounterMode` during the warm-up (matmuls, convolutions and
attention, the CPU flash-attention kernels included): the ratio that doing the method's extra
work at the baseline's efficiency would give. *ratio ÷ floor* near 1 means stc adds no overhead
beyond the arithmetic the method needs; above 1 is overhead (or a memory/threads effect), below
1 means the extra FLOPs run more efficiently (bigger matmuls) than the baseline's.

- Training (1–3): stc's `Trainer.train_step()` (NeTI: mapper → one batched text-encoder call of
  16 rows → UNet with per-layer keys/values → MSE → AdamW on the mapper) against textual
  inversion on the same frozen models (one trainable vector, one text-encoder row, stock
  attention). The text-encoder call count is measured with a hook on the transformer stack;
  the "reference design" runs the same step with one call per UNet layer (16), as the reference
  NeTI code does. Peak memory is above the level before the step (the first step: it includes
  creating the optimizer state, 4.5 MB for the mapper, 6 kB for the vector): on CUDA
  `torch.cuda.max_memory_allocated`, on the CPU the tensor allocations recorded by torch's
  profiler (`profile_memory`), which does not depend on the C allocator's page caching.
- Rendering (4): seconds per image, end to end (text encoding, denoising with CFG 7.5, VAE
  decode to PIL). NeTI must encode 16 text rows per denoising step (one per layer, each with the
  step's mapper output) where plain SD encodes one prompt per render: that is the FLOP floor.
  The share of that work shrinks with the batch (the conditioning is shared by the images) and
  grows with fewer UNet FLOPs (smaller images); the VAE decode, a fixed cost per image, dilutes
  both sides equally, so few steps make the ratio look better than 50 steps would: compare
  *ratio ÷ floor*, and see the per-module FLOPs in the JSON.
- Concept size (5): `mapper.safetensors` for a 768-wide text encoder (SD 1.x) against the
  reference implementation's checkpoint (`tests/data/neti-sample-mapper.pt`).
- CLI (6–7): wall time of a subprocess against `python -c pass` with the same interpreter; the
  goal is on the difference.
- `--model builtin:tiny` (what `--quick` and CI run) checks that the benchmark works; its ratios
  mean nothing: at 64 px with 32-wide layers fixed per-call overheads dominate and the text
  encoder costs as much as the UNet.
"""


def markdown(data: dict) -> str:
    meta = data["meta"]
    m = meta["machine"]
    threads = f"{m['torch_threads']} intra-op / {m['torch_interop_threads']} inter-op"
    lines = [
        BEGIN,
        "",
        f"Latest run: **{meta['date']}**, model `{meta['model']}` ({meta['model_note']}), device `{m['device']}`, "
        f"dtype {', '.join(meta['dtypes'])}, {meta['resolution']} px, "
        f"{meta['steps']} denoising step{'s' if meta['steps'] != 1 else ''} "
        f"({'with' if meta.get('decode', True) else 'without'} the VAE decode), "
        f"repeats {meta['repeats']} (CLI {meta['cli_repeats']}), {meta['concepts']} concepts for `stc ls`.",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        markdown_table(data["figures"]),
        "",
        f"Goals met: {sum(r['met'] for r in data['figures'])} of {len(data['figures'])}."
        + "".join(f" **Failed: {error}**" for error in meta.get("errors", [])),
        "",
        "**Machine.** " + "; ".join([
            f"CPU: {m['cpu']}, {m['cores']} cores ({m['cores_available']} available)",
            f"memory {m['memory_gb']} GB",
            f"torch {m['torch']} with {threads} threads (chosen as stc does: stc.models.threads)",
            f"diffusers {m['diffusers']}, transformers {m['transformers']}, accelerate {m['accelerate']}",
            f"Python {m['python']}",
            f"device {m['device']}" + (f" ({m['gpu']}, CUDA {m['cuda']})" if m.get("gpu") else ""),
            f"load average before / after: {meta['load_before']} / {meta['load_after']}",
            f"whole run {meta['seconds']:.0f} s",
        ]) + ".",
        "",
        "What each side runs:",
        "",
        sides_table(data["figures"]),
        "",
        HOW_TO_READ,
        END,
    ]
    return "\n".join(lines)


def write_markdown(path: Path, data: dict) -> None:
    """Rewrite the generated part of ``path``; anything outside the markers is kept."""
    generated = markdown(data)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            new = head + generated + tail
        else:
            new = text.rstrip() + "\n\n" + generated + "\n"
    else:
        new = ("# Benchmarks\n\n`python -m benchmarks` measures stc against its baselines in one run.\n\n"
               + generated + "\n")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(new, encoding="utf-8")
    os.replace(temporary, path)
