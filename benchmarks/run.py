"""``python -m benchmarks``: stc side by side with its baselines, in one run, as ratios."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from . import report
from .models import SD15, SDXL, default_cache, model_spec

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"
QUICK_JSON = ROOT / "benchmarks" / "results" / "quick.json"
MARKDOWN = ROOT / "BENCHMARKS.md"
GROUPS = ("train", "render", "reference", "size", "cli", "errors")

GOALS = {
    "train_step": {"kind": "ratio_max", "value": 1.30},
    "text_encoder_calls": {"kind": "value_eq", "value": 1},
    "train_peak_memory": {"kind": "ratio_max", "value": 1.15},
    "train_vs_reference": {"kind": "ratio_max", "value": 0.5},
    "train_memory_vs_reference": {"kind": "ratio_max", "value": 0.5},
    "render_bs1": {"kind": "ratio_max", "value": 1.15},
    "render_bs4": {"kind": "ratio_max", "value": 1.05},
    "render_bs1_denoise": {"kind": "ratio_max", "value": 1.15},
    "render_bs4_denoise": {"kind": "ratio_max", "value": 1.05},
    "concept_size": {"kind": "value_max", "value": 2.3e6},
    "concept_size_fp16": {"kind": "value_max", "value": 2.3e6},
    "cli": {"kind": "delta_max", "value": 0.3},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="stc side by side with its baselines (textual inversion, plain diffusers, the reference "
        "NeTI checkpoint, bare Python), in one run, as ratios.",
    )
    parser.add_argument("--model", default=None, help="sd15 or sdxl (SD 1.5's or SDXL base's architecture, "
                        "random weights, built once and cached), builtin:tiny, builtin:tiny-sdxl, or any model spec "
                        "stc accepts (default: sd15)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, help="fp32, fp16, bf16, or several comma-separated "
                        "(default: fp32 on the CPU, fp16,bf16 on CUDA)")
    parser.add_argument("--resolution", type=int, default=None, help="image size in px (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per render (default: 4 on "
                        "the CPU, 50 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per side for training and "
                        "rendering (default 3)")
    parser.add_argument("--cli-repeats", type=int, default=None, help="timed repeats per side for CLI "
                        "commands (default 7)")
    parser.add_argument("--concepts", type=int, default=None, help="concepts in the scratch registry for "
                        "stc ls (default 1000)")
    parser.add_argument("--only", default=None, help=f"comma-separated groups to run: {', '.join(GROUPS)} "
                        "(default: all; reference only on CUDA: stc's step at its defaults against the reference "
                        "design as it runs, fp32, bmm attention, one text-encoder call per layer)")
    parser.add_argument("--no-bs4", action="store_true", help="skip the batch-4 render")
    parser.add_argument("--no-decode", action="store_true", help="renders stop at the latents on both sides "
                        "(stc: Renderer.latents, the same path as render_requests without the VAE decode; "
                        "diffusers: output_type='latent'): the decode is the same work on both sides and, at "
                        "512 px on a CPU, costs more than a denoising step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (sets STC_THREADS; "
                        "default: what stc chooses)")
    parser.add_argument("--quick", action="store_true", help="builtin:tiny (or --model builtin:tiny-sdxl) at "
                        "64 px, 2 steps, 1 repeat, 100 concepts: checks that the benchmark works (what CI runs); "
                        "ratios mean nothing")
    parser.add_argument("--json", type=Path, default=None, help=f"JSON output (default "
                        f"{DEFAULT_JSON.relative_to(ROOT)}; --quick: {QUICK_JSON.relative_to(ROOT)})")
    parser.add_argument("--write-md", action="store_true", help=f"rewrite the generated part of "
                        f"{MARKDOWN.name} from this run")
    parser.add_argument("--markdown", type=Path, default=MARKDOWN, help=argparse.SUPPRESS)
    parser.add_argument("--md-from", type=Path, default=None, metavar="JSON", help=f"measure nothing: rewrite the "
                        f"generated part of {MARKDOWN.name} from a results file of an earlier run")
    parser.add_argument("--cache", type=Path, default=None, help=f"where sd15 is built and kept (default "
                        f"$STC_BENCH_CACHE or {default_cache()})")
    parser.add_argument("--profile", type=Path, default=None, help="also profile one NeTI/TI training step "
                        "and one stc/diffusers render (batch 1) with torch.profiler; tables go to this folder")
    args = parser.parse_args(argv)
    if args.quick:
        if args.model is not None and not args.model.startswith("builtin:tiny"):
            parser.error("--quick runs a builtin random-weight model: builtin:tiny (the default) or builtin:tiny-sdxl")
        args.model = args.model or "builtin:tiny"
        args.steps = args.steps or 2
        args.repeats = args.repeats if args.repeats is not None else 1
        args.cli_repeats = args.cli_repeats if args.cli_repeats is not None else 1
        args.concepts = args.concepts or 100
    args.model = args.model or SD15
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device == "cuda"
    args.dtypes = [d.strip() for d in (args.dtype or ("fp16,bf16" if on_gpu else "fp32")).split(",") if d.strip()]
    for dtype in args.dtypes:
        if dtype not in ("fp32", "fp16", "bf16"):
            parser.error(f"--dtype: {dtype!r} is not fp32, fp16 or bf16")
        if dtype == "fp16" and not on_gpu:
            parser.error("--dtype fp16 needs --device cuda (stc refuses fp16 on the CPU); use fp32 or bf16")
    args.steps = args.steps or (50 if on_gpu else 4)
    args.repeats = args.repeats if args.repeats is not None else 3
    args.cli_repeats = args.cli_repeats if args.cli_repeats is not None else 7
    args.concepts = args.concepts or 1000
    # the reference-design comparison loads the model twice more: by default on CUDA only
    default_groups = set(GROUPS) - (set() if on_gpu else {"reference"})
    args.groups = default_groups if not args.only else {g.strip() for g in args.only.split(",")}
    unknown = args.groups - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
    if args.json is None:
        args.json = QUICK_JSON if args.quick else DEFAULT_JSON
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- groups


def size_figures() -> list[dict]:
    from .cli import concept_sizes

    sizes = concept_sizes()
    details = {"reference": sizes.reference_source, "text_width": 768}
    common = dict(stc_label="stc mapper.safetensors, text width 768", baseline_label="reference NeTI checkpoint "
                  "(tests/data/neti-sample-mapper.pt)", details=details)
    return [
        report.figure("concept_size", 5, "concept size on disk (fp32)", "bytes", sizes.fp32_bytes,
                      sizes.reference_bytes, GOALS["concept_size"], **common),
        report.figure("concept_size_fp16", 5, "concept size on disk (tensors cast to fp16)", "bytes",
                      sizes.fp16_bytes, sizes.reference_bytes, GOALS["concept_size_fp16"], **common),
    ]


def command_figures(args, groups: set[str]) -> list[dict]:
    from .cli import cli_commands, make_registry, time_commands

    started = time.monotonic()
    home = make_registry(args.concepts)
    log(f"scratch registry with {args.concepts} concepts in {time.monotonic() - started:.1f} s: {home}")
    try:
        cli, errors = cli_commands("c0042" if args.concepts > 42 else "c0000")
        figures = []
        for number, commands, group in ((6, cli, "cli"), (7, errors, "errors")):
            if group not in groups:
                continue
            log(f"figure {number}: {'CLI wall time' if number == 6 else 'time to the first error'}")
            for result in time_commands(commands, home, args.cli_repeats, log):
                label = result.command.label
                title = f"`{label}`" + (f" ({args.concepts} concepts)" if result.command.key == "cli_ls" else "")
                figures.append(report.figure(
                    result.command.key, number, title, "s", result.stc, result.baseline, GOALS["cli"],
                    stc_label=label + " (subprocess)", baseline_label="python -c pass",
                    details={"exit_code": result.exit_code, "stderr": result.stderr_tail,
                             "unexpected_outcome": result.unexpected},
                ))
        return figures
    finally:
        shutil.rmtree(home, ignore_errors=True)


def model_figures(args, spec: str, dtype: str) -> tuple[list[dict], dict]:
    import torch

    from stc.models.base import load_base_model

    started = time.monotonic()
    base = load_base_model(spec, device=args.device, dtype=dtype)
    threads = torch.get_num_threads()
    resolution = args.resolution or base.default_resolution
    log(f"loaded {args.model} ({dtype}) in {time.monotonic() - started:.1f} s; torch threads {threads}; "
        f"load average {report.load_average()}")
    stock = dict(base.pipeline.unet.attn_processors)
    sdxl = getattr(base.pipeline, "text_encoder_2", None) is not None
    figures: list[dict] = []
    info = {"threads": threads, "resolution": resolution}

    training = bench = None
    if "train" in args.groups:
        from .training import run_training

        t = training = run_training(base, args.device, dtype, resolution, args.repeats, log, stock_processors=stock)
        layers = t.reference_calls
        flop_ratio = t.stc_flops.total / t.ti_flops.total if t.ti_flops.total else None
        details = {
            "stc_flops": t.stc_flops.to_dict(), "baseline_flops": t.ti_flops.to_dict(),
            "reference_design_time_s": t.reference_time,
            "reference_design_flops": t.reference_flops.to_dict() if t.reference_flops else None,
        }
        figures.append(report.figure(
            "train_step", 1, f"training step (fwd+bwd+AdamW), batch 1, {resolution} px", "s", t.stc_time,
            t.ti_time, GOALS["train_step"], dtype=dtype, flop_ratio=flop_ratio, details=details,
            stc_label=f"NeTI: stc Trainer.train_step() (mapper, {layers}-row text batch, UNet, AdamW on the mapper)",
            baseline_label=f"textual inversion: one vector{' per text encoder' if sdxl else ''}, stock text "
            "encoder forward and attention, AdamW on the vector",
        ))
        figures.append(report.figure(
            "text_encoder_calls", 2, "text-encoder calls per training step", "calls", t.stc_calls,
            t.reference_calls, GOALS["text_encoder_calls"], dtype=dtype,
            stc_label="NeTI step (calls of the text encoder's transformer stack, counted by a hook)",
            baseline_label="reference design: one call per UNet layer (the same step, counted the same way)",
            details={"textual_inversion_calls": t.ti_calls},
        ))
        figures.append(report.figure(
            "train_peak_memory", 3, f"peak memory of a training step above the level before it, {resolution} px",
            "bytes", t.stc_memory["peak"], t.ti_memory["peak"], GOALS["train_peak_memory"], dtype=dtype,
            stc_label="NeTI step", baseline_label="textual-inversion step",
            details={"method": t.stc_memory.get("method"), "stc_retained": t.stc_memory.get("retained"),
                     "baseline_retained": t.ti_memory.get("retained")},
        ))
        gc.collect()

    if "render" in args.groups:
        from .rendering import RenderBench

        bench = RenderBench(base, stock, args.steps, resolution, decode=not args.no_decode)
        for batch in (1,) if args.no_bs4 else (1, 4):
            r = bench.measure(batch, args.repeats, args.device, log)
            flop_ratio = r.stc_flops.total / r.base_flops.total if r.base_flops.total else None
            what = "without the VAE decode" if args.no_decode else "with the VAE decode"
            figures.append(report.figure(
                f"render_bs{batch}", 4, f"render time per image, batch {batch}, "
                f"{args.steps} step{'s' if args.steps != 1 else ''}, {resolution} px, "
                f"{what}", "s", r.stc_time, r.base_time, GOALS[f"render_bs{batch}"], dtype=dtype,
                flop_ratio=flop_ratio,
                stc_label="stc gen path: Renderer." + ("latents" if args.no_decode else "render_requests")
                + " with a random concept of the model's text width",
                baseline_label=f"diffusers {type(base.pipeline).__name__}.__call__" + (
                    " (output_type='latent')" if args.no_decode else "")
                + ", same components and DPM scheduler",
                details={"stc_flops": r.stc_flops.to_dict(), "baseline_flops": r.base_flops.to_dict(),
                         "stc_text_encoder_calls": r.stc_calls, "baseline_text_encoder_calls": r.base_calls},
            ))
            if args.no_decode:
                continue
            decoder = "vae decoder"
            stc_loop = r.stc_flops.total - r.stc_flops.by_module.get(decoder, 0)
            base_loop = r.base_flops.total - r.base_flops.by_module.get(decoder, 0)
            figures.append(report.figure(
                f"render_bs{batch}_denoise", 4,
                f"render time per image, batch {batch}, minus the time in the VAE decoder",
                "s", r.stc_denoise, r.base_denoise, GOALS[f"render_bs{batch}_denoise"], dtype=dtype,
                flop_ratio=stc_loop / base_loop if base_loop else None,
                stc_label="the same runs, minus the time inside vae.decoder (forward hooks)",
                baseline_label="the same runs, minus the time inside vae.decoder (forward hooks)",
                details={"note": "per-step view: the VAE decode is a fixed cost per image that dilutes the "
                         "ratio at few steps"},
            ))
            gc.collect()

    if args.profile:
        from .profiling import profile_model

        profile_model(base, args, dtype, resolution, stock, training, bench, log)
    del base, training, bench
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return figures, info


def reference_figures(args, spec: str) -> list[dict]:
    """Figure 8: stc's training step at its defaults for the device (the first --dtype) against the
    reference design as the reference implementation runs (fp32, bmm attention, a text-encoder call
    per layer): time and peak memory, the weights included."""
    from stc.models.base import load_base_model

    from .training import run_reference

    probe = load_base_model(spec, device="cpu")  # the size only
    resolution = args.resolution or probe.default_resolution
    del probe
    dtype = args.dtypes[0]
    r = run_reference(spec, args.device, dtype, resolution, args.repeats, log)
    memory_key = "total_peak" if "total_peak" in r.stc_memory else "peak"
    what = "weights included" if memory_key == "total_peak" else "above the level before it"
    return [
        report.figure(
            "train_vs_reference", 8, f"training step, batch 1, {resolution} px, stc at {dtype} vs the reference "
            "design at fp32", "s", r.stc_time, r.reference_time, GOALS["train_vs_reference"], dtype=dtype,
            stc_label=f"stc Trainer.train_step() at its defaults here ({dtype}, SDPA, one batched text call)",
            baseline_label=f"reference design: fp32, bmm attention, {r.reference_calls} text-encoder calls per step",
            details={"stc_text_encoder_calls": r.stc_calls, "reference_text_encoder_calls": r.reference_calls},
        ),
        report.figure(
            "train_memory_vs_reference", 8, f"peak memory of that training step ({what})", "bytes",
            r.stc_memory[memory_key], r.reference_memory[memory_key], GOALS["train_memory_vs_reference"],
            dtype=dtype, stc_label=f"stc step ({dtype})", baseline_label="reference design step (fp32)",
            details={"method": r.stc_memory.get("method")},
        ),
    ]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.md_from is not None:
        import json

        data = json.loads(args.md_from.read_text(encoding="utf-8"))
        report.write_markdown(args.markdown, data)
        print(report.text_table(data["figures"]))
        log(f"wrote {args.markdown} from {args.md_from}")
        return 0
    if args.threads is not None:
        os.environ["STC_THREADS"] = str(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    started = time.monotonic()
    load_before = report.load_average()
    command = "python -m benchmarks" + "".join(" " + shlex.quote(a)
                                               for a in (argv if argv is not None else sys.argv[1:]))
    log(f"{command}\nload average {load_before}; device {args.device}; dtypes {', '.join(args.dtypes)}")

    figures: list[dict] = []
    errors: list[str] = []
    if "size" in args.groups:
        figures += size_figures()
    if args.groups & {"cli", "errors"}:
        figures += command_figures(args, args.groups)
    model_info = {}
    model_note = "builtin, random weights" if args.model.startswith("builtin:") else "as given"
    if args.groups & {"train", "render", "reference"}:
        import torch

        torch.manual_seed(0)
        spec = model_spec(args.model, args.cache, log=log)
        if args.model == SD15:
            model_note = "SD 1.5 architecture, random weights, built from its configuration"
        elif args.model == SDXL:
            model_note = "SDXL base 1.0 architecture, random weights, built from stc's shipped configuration"
        for dtype in args.dtypes if args.groups & {"train", "render"} else []:
            try:
                more, model_info = model_figures(args, spec, dtype)
            except Exception as exc:  # keep what was measured (a later dtype or the files still come)
                import traceback

                traceback.print_exc()
                errors.append(f"{args.model} {dtype}: {type(exc).__name__}: {exc}")
                continue
            figures += more
        if "reference" in args.groups:
            try:
                figures += reference_figures(args, spec)
            except Exception as exc:  # keep what was measured
                import traceback

                traceback.print_exc()
                errors.append(f"{args.model} reference: {type(exc).__name__}: {exc}")

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "model": args.model,
        "model_note": model_note,
        "device": args.device,
        "dtypes": args.dtypes,
        "resolution": model_info.get("resolution", args.resolution),
        "steps": args.steps,
        "decode": not args.no_decode,
        "repeats": args.repeats,
        "cli_repeats": args.cli_repeats,
        "concepts": args.concepts,
        "quick": args.quick,
        "machine": report.machine_info(args.device),
        "load_before": load_before,
        "load_after": report.load_average(),
        "seconds": time.monotonic() - started,
        "errors": errors,
    }
    if model_info:
        meta["machine"]["torch_threads"] = model_info["threads"]
    figures.sort(key=lambda f: f["figure"])  # stable: the order within a figure stays
    data = {"meta": meta, "figures": figures}
    print(report.text_table(figures))
    print(f"\ngoals met: {sum(f['met'] for f in figures)} of {len(figures)}; torch threads "
          f"{meta['machine']['torch_threads']}; {meta['seconds']:.0f} s")
    report.write_json(args.json, data)
    log(f"wrote {args.json}")
    if args.write_md:
        report.write_markdown(args.markdown, data)
        log(f"wrote {args.markdown}")
    for error in errors:
        log(f"ERROR: {error}")
    return 1 if errors else 0
