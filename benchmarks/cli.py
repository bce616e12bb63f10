"""Figures 5-7: concept size on disk, CLI wall times, time to the first error.

CLI commands run as subprocesses against a scratch ``STC_HOME`` holding copies of one saved
concept; the baseline is ``python -c pass`` with the same interpreter, alternated with them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .measure import Samples

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_CHECKPOINT = ROOT / "tests" / "data" / "neti-sample-mapper.pt"
REFERENCE_CHECKPOINT_BYTES = 2_270_285  # its size, in case the test data is not there
TEXT_WIDTH_SD1 = 768


# --------------------------------------------------------------------------- figure 5


@dataclass
class SizeResults:
    fp32_bytes: int
    fp16_bytes: int
    reference_bytes: int
    reference_source: str


def concept_sizes() -> SizeResults:
    import torch
    from safetensors.torch import save

    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.store.conceptio import WEIGHTS_FORMAT, weights_bytes

    mapper = NeTIMapper(MapperConfig(text_width=TEXT_WIDTH_SD1, norm_scale=0.4),
                        generator=torch.Generator().manual_seed(0))
    fp32 = weights_bytes(mapper, "bench")
    half = {key: value.detach().to(torch.float16).contiguous() for key, value in mapper.state_dict().items()}
    fp16 = save(half, metadata={"format": WEIGHTS_FORMAT, "name": "bench"})
    if REFERENCE_CHECKPOINT.is_file():
        reference, source = REFERENCE_CHECKPOINT.stat().st_size, str(REFERENCE_CHECKPOINT.relative_to(ROOT))
    else:
        reference, source = REFERENCE_CHECKPOINT_BYTES, "recorded size of tests/data/neti-sample-mapper.pt"
    return SizeResults(len(fp32), len(fp16), reference, source)


# --------------------------------------------------------------------------- scratch registry


def make_registry(count: int, root: Path | None = None) -> Path:
    """A scratch STC_HOME with ``count`` concepts: one saved through the registry, copied."""
    import torch

    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.models.backbones import SD_LAYER_NAMES
    from stc.store.concept import Concept, TrainingRecord
    from stc.store.conceptio import weights_bytes
    from stc.store.registry import Registry
    from stc.train.config import TrainConfig

    home = Path(root or tempfile.mkdtemp(prefix="stc-bench-home-"))
    registry = Registry(home)
    mapper = NeTIMapper(MapperConfig(text_width=TEXT_WIDTH_SD1, norm_scale=0.4),
                        generator=torch.Generator().manual_seed(0))
    concept = Concept(
        name="c0000", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", initializer="cat",
        text_width=TEXT_WIDTH_SD1, layer_names=list(SD_LAYER_NAMES), mapper=mapper.config.to_dict(),
        training=TrainingRecord(settings=TrainConfig(initializer="cat").record_settings(), steps_done=1000,
                                resolution=512),
    )
    saved = registry.save(concept, weights_bytes(mapper, concept.name))
    source = saved.path
    text = (source / "concept.yaml").read_text(encoding="utf-8")
    for index in range(1, count):
        name = f"c{index:04d}"
        target = registry.concepts_dir / name
        shutil.copytree(source, target)
        (target / "concept.yaml").write_text(
            text.replace("name: c0000", f"name: {name}").replace("token: <c0000>", f"token: <{name}>"),
            encoding="utf-8",
        )
    return home


# --------------------------------------------------------------------------- figures 6, 7


def stc_command() -> list[str]:
    script = Path(sys.executable).with_name("stc")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "stc"]


@dataclass
class Command:
    key: str
    label: str
    args: list[str]
    expect_code: int  # 0, or 1 for the error figures
    expect_stderr: str = ""


def cli_commands(show_name: str) -> tuple[list[Command], list[Command]]:
    cli = [
        Command("cli_help", "stc --help", ["--help"], 0),
        Command("cli_ls", "stc ls", ["ls"], 0),
        Command("cli_show", f"stc show {show_name}", ["show", show_name], 0),
    ]
    errors = [
        Command("error_bad_name", "stc train examples/cat --name BAD!",
                ["train", str(ROOT / "examples" / "cat"), "--name", "BAD!"], 1, "Error:"),
        Command("error_steps_0", "stc train examples/cat --name x --steps 0",
                ["train", str(ROOT / "examples" / "cat"), "--name", "x", "--steps", "0"], 1, "Error:"),
        Command("error_unknown_concept", 'stc gen "<nosuch> on the moon"', ["gen", "<nosuch> on the moon"], 1,
                "Error:"),
    ]
    return cli, errors


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: list[str], env: dict, timeout: float = 120.0) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the subprocess, its result)."""
    cpu, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return time.perf_counter() - started, _children_cpu() - cpu, done


@dataclass
class CommandResult:
    command: Command
    stc: Samples
    baseline: Samples
    exit_code: int
    stderr_tail: str
    unexpected: bool = False  # the exit code or stderr was not what the figure expects


def time_commands(commands: list[Command], home: Path, repeats: int, log) -> list[CommandResult]:
    """Warm each command up once, then alternate ``python -c pass`` and the command ``repeats``
    times (the order flips every round)."""
    env = {**os.environ, "STC_HOME": str(home), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "120"}
    env.pop("STC_DEBUG", None)
    baseline = [sys.executable, "-c", "pass"]
    stc = stc_command()
    results = []
    for command in commands:
        argv = stc + command.args
        _, _, warm = _run(argv, env)  # warm-up (also builds stc ls's cache)
        _run(baseline, env)
        unexpected = warm.returncode != command.expect_code or command.expect_stderr not in warm.stderr
        if unexpected:  # still timed, and flagged in the results
            log(f"  WARNING: {command.label} exited {warm.returncode} (expected {command.expect_code}); "
                f"stderr: {warm.stderr.strip()[-300:]}")
        stc_times, base_times = Samples(), Samples()
        for index in range(repeats):
            pair = [(argv, stc_times), (baseline, base_times)]
            if index % 2:
                pair.reverse()
            for args, samples in pair:
                seconds, cpu, _ = _run(args, env)
                samples.values.append(seconds)
                samples.cpu.append(cpu)
        log(f"  {command.label}: {stc_times.median:.3f} s (python -c pass {base_times.median:.3f} s)")
        tail = warm.stderr.strip().splitlines()[-1:] if warm.stderr.strip() else []
        results.append(CommandResult(command, stc_times, base_times, warm.returncode, " ".join(tail)[:300],
                                     unexpected))
    return results
