"""``python -m benchmarks.gpu --out DIR``: the one prepared GPU run (or, with ``--quick --device
cpu``, the same run at tiny size, which the tests run).

In order, each part writing what it measured into ``DIR/gpu-run.json`` as soon as it is done (a
run stopped by its time limit keeps what it finished):

1. ``ratios``: ``python -m benchmarks`` on the SD 1.5 architecture (random weights, 512 px): the
   training step against textual inversion and its peak memory, rendering at 50 DPM steps
   against the plain pipeline (batch 1 and 4), for every ``--dtype``; and stc's step at its
   defaults against the reference design as it runs (fp32, bmm attention, 16 text-encoder calls).
2. ``precision``: the same trainer, the same initial mapper and the same batches in fp32, fp16
   and bf16 mixed precision: every loss finite, and each precision's losses relative to fp32's.
3. ``train``: ``stc train`` for 200 optimizer steps in fp16 and in bf16 (100, then a resume from
   the checkpoint to 200), each loss finite, and ``stc gen`` of the result in that precision.
4. ``export``: the fp16 concept exported as diffusers, rendered by a plain
   ``StableDiffusionPipeline`` on the device and by ``stc gen`` on the device: pixel difference.

Every figure comes from this run; nothing is filled in by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "cat"
PARTS = ("ratios", "precision", "train", "export")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-run.json, logs and renders")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: the rehearsal)")
    parser.add_argument("--model", default=None, help="default: sd15 (builtin:tiny with --quick)")
    parser.add_argument("--dtype", default=None, help="the ratio run's dtypes (default: fp16,bf16,fp32 on CUDA; "
                        "fp32,bf16 on the CPU)")
    parser.add_argument("--only", default=None, help=f"comma-separated parts: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere: checks that the run works")
    args = parser.parse_args(argv)
    args.model = args.model or ("builtin:tiny" if args.quick else "sd15")
    gpu = args.device.startswith("cuda")
    args.dtypes = (args.dtype or ("fp16,bf16,fp32" if gpu else "fp32,bf16")).split(",")
    args.mixed = [d for d in ("fp16", "bf16") if gpu or d != "fp16"]  # the CPU has no fp16
    args.parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(","))
    args.train_steps = 20 if args.quick else 200
    args.render_steps = 2 if args.quick else 30
    return args


class Record:
    """gpu-run.json, rewritten after every part."""

    def __init__(self, path: Path, args):
        self.path, self.data = path, {"command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:]),
                                      "device": args.device, "model": args.model, "parts": {}}

    def put(self, part: str, value) -> None:
        self.data["parts"][part] = value
        self.path.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ratios(args, out: Path) -> dict:
    from .run import main as benchmark

    result = out / "benchmarks.json"
    argv = ["--model", args.model, "--device", args.device, "--dtype", ",".join(args.dtypes), "--json", str(result),
            "--only", "train,render,reference"]
    if args.quick:
        argv += ["--quick", "--only", "train,render,reference"]
    code = benchmark(argv)
    figures = json.loads(result.read_text(encoding="utf-8"))
    keys = ("id", "dtype", "title", "ratio", "met", "flop_ratio")
    return {"exit_code": code, "json": result.name,
            "figures": [{key: f.get(key) for key in keys} for f in figures["figures"]]}


def precision(args, spec: str) -> dict:
    """Losses of the same 4 optimizer steps (same initial mapper, same batches) in each precision."""
    import torch

    from stc.models.base import load_base_model
    from stc.train.config import TrainConfig
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    from .training import _accelerator

    losses = {}
    for dtype in ["fp32", *args.mixed]:
        base = load_base_model(spec, device=args.device, dtype=dtype)
        accelerator, mixed = _accelerator(args.device, dtype)
        config = TrainConfig(steps=4, batch_size=1, grad_accum=1, seed=0, initializer="cat", mixed_precision=mixed)
        photos = load_photos(PHOTOS, base.default_resolution).images
        trainer = Trainer(base, photos, "<gpucheck>", config, accelerator)
        losses[dtype] = [trainer.train_step() for _ in range(4)]
        del trainer, base
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    reference = losses["fp32"]
    return {
        "losses": losses,
        "finite": {dtype: all(math.isfinite(v) for v in values) for dtype, values in losses.items()},
        "relative_to_fp32": {dtype: max(abs(a - b) / abs(b) for a, b in zip(values, reference))
                             for dtype, values in losses.items() if dtype != "fp32"},
    }


def _stc(args_list, env, capture: bool = False) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stc", *map(str, args_list)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        log(done.stderr[-2000:])
    result = {"command": "stc " + " ".join(map(str, args_list)), "exit_code": done.returncode,
              "seconds": round(time.monotonic() - started, 1), "stdout_tail": done.stdout.strip().splitlines()[-1:]}
    if capture:
        result["stdout"] = done.stdout
    return result


def _stc_interrupted(args_list, env, concept: Path) -> dict:
    """``stc train`` stopped as Ctrl-C stops it (SIGINT) once its first checkpoint is saved: it
    finishes the current step, saves a checkpoint there and exits 130."""
    import signal

    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "stc", *map(str, args_list)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = concept / "checkpoint" / "state.json"
    while process.poll() is None and not checkpoint.is_file():
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate()
    if process.returncode not in (0, 130):
        log(stderr[-2000:])
    saved = json.loads(checkpoint.read_text(encoding="utf-8")) if checkpoint.is_file() else {}
    return {"command": "stc " + " ".join(map(str, args_list)) + "  (SIGINT after the first checkpoint)",
            "exit_code": process.returncode, "seconds": round(time.monotonic() - started, 1),
            "stopped_at_step": saved.get("step"), "stderr_tail": stderr.strip().splitlines()[-2:]}


def train(args, spec: str, out: Path, env: dict) -> dict:
    """200 steps (100, then resumed to 200) in each mixed precision, then a render in it."""
    results = {}
    half = args.train_steps // 2
    for dtype in args.mixed:
        name = f"gpu-{dtype}"
        steps = [
            _stc_interrupted(["train", PHOTOS, "--name", name, "--model", spec, "--init", "cat", "--steps",
                              args.train_steps, "--save-every", half, "--preview-every", 0, "--mixed-precision",
                              dtype, "--device", args.device], env, Path(env["STC_HOME"]) / "concepts" / name),
            _stc(["train", "--resume", name, "--device", args.device], env),
            _stc(["gen", f"<{name}> on the moon", "--steps", args.render_steps, "--dtype", dtype, "--device",
                  args.device, "--out", out / "renders"], env),
        ]
        metrics = Path(env["STC_HOME"]) / "concepts" / name / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if metrics.is_file() else []
        loss_values = [line["loss"] for line in lines if "loss" in line]
        shown = _stc(["show", name, "--json"], env, capture=True)["stdout"]
        results[dtype] = {
            "commands": steps,
            "steps_done": json.loads(shown or "{}").get("steps_done"),
            "losses_logged": len(loss_values),
            "all_finite": bool(loss_values) and all(math.isfinite(v) for v in loss_values),
            "first_last_loss": [loss_values[0], loss_values[-1]] if loss_values else None,
        }
    return results


def export(args, spec: str, out: Path, env: dict) -> dict:
    """The fp16 (CPU: bf16) concept as a diffusers export, rendered by the plain pipeline on the
    device and compared with stc gen's image on the device."""
    import numpy as np
    import torch
    from PIL import Image

    dtype = args.mixed[0]
    name = f"gpu-{dtype}"
    folder = out / "export"
    made = _stc(["export", name, "--format", "diffusers", "--out", folder, "--force"], env)
    gen = _stc(["gen", f"<{name}> on the moon", "--steps", args.render_steps, "--dtype", dtype, "--device",
                args.device, "--seed", 3, "--rank", 8, "--out", out / "export-stc"], env)
    stc_image = Path(gen["stdout_tail"][0]) if gen["stdout_tail"] else None
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sys.path.insert(0, str(folder / name))
    from stc_concept import load_concept

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = spec if Path(spec).exists() else None
    if model is None:  # a builtin: the folder stc would load, saved for diffusers
        from stc.models.base import load_base_model

        model = out / "model"
        load_base_model(spec, device="cpu").pipeline.save_pretrained(model)
    pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch_dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(args.device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_concept(pipe, folder / name, rank=8)
    image = pipe(f"<{name}> on the moon", num_inference_steps=args.render_steps, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(3)).images[0]
    image.save(out / "export-diffusers.png")
    result = {"export": made, "stc_gen": gen}
    if stc_image is not None and stc_image.is_file():
        with Image.open(stc_image) as theirs:
            a = np.asarray(theirs.convert("RGB")).astype(np.int16)
        b = np.asarray(image.convert("RGB")).astype(np.int16)
        difference = np.abs(a - b)
        result.update(max_pixel_difference=int(difference.max()), fraction_differing=float((difference > 0).mean()),
                      mean_pixel_difference=float(difference.mean()))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = Record(out / "gpu-run.json", args)
    import torch

    from .models import model_spec

    record.data["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    spec = model_spec(args.model, log=log)
    env = {**os.environ, "STC_HOME": str(out / "stc-home"), "HF_HUB_OFFLINE": "1"}
    failed = []
    for part in args.parts:
        started = time.monotonic()
        log(f"== {part}")
        try:
            if part == "ratios":
                value = ratios(args, out)
            elif part == "precision":
                value = precision(args, spec)
            elif part == "train":
                value = train(args, spec, out, env)
            elif part == "export":
                value = export(args, spec, out, env)
            else:
                raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
        except Exception as exc:  # keep the other parts
            import traceback

            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(part)
        value = {**value, "seconds": round(time.monotonic() - started, 1)} if isinstance(value, dict) else value
        record.put(part, value)
    log(f"wrote {record.path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
