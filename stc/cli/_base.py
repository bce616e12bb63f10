"""Shared pieces of the command line: the app, consoles, option aliases, error boundary.

Heavy libraries (torch, diffusers, transformers) are imported inside commands, and the command
modules themselves only when their command runs (``_lazy.py``), so ``stc --help`` and ``stc ls``
answer instantly.
"""

from __future__ import annotations

import functools
import os
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand

from .. import __version__
from ..errors import BadInput, StcError
from ..settings import Settings
from ._lazy import LazyGroup

app = typer.Typer(
    cls=LazyGroup,
    name="stc",
    help="Personalize Stable Diffusion with neural space-time concepts (NeTI): train a concept "
    "from a few photos, keep it in a local registry, render it at any truncation rank.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: option names in full and descriptions wide at any width
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)

# Shared option aliases --------------------------------------------------------------------
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Base model (SD 1.x, SD 2.x or SDXL): a hub id, a local diffusers folder, a single-file checkpoint "
        "(.safetensors, or a weights-only .ckpt), builtin:shapes / builtin:shapes-sdxl (a tiny trained world of "
        "coloured shapes, 32 px, in the SD 1.x / SDXL layout), or builtin:tiny / builtin:tiny-sd2 / "
        "builtin:tiny-sdxl (random weights, for tests).  [default: the concept's, else STC_MODEL or model: in "
        "$STC_HOME/config.yaml, else SD 1.5]",
    ),
]
ModelConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--model-config", help="For a single-file --model: a local diffusers folder of its architecture (its "
        "configs and tokenizer), or just a CLIP tokenizer folder (SD 1.x, 2.x and SDXL configs ship with stc)."
    ),
]


PredictionTypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--prediction-type", show_default=False,
        help="epsilon or v_prediction: what the base model predicts (also STC_PREDICTION_TYPE); pass epsilon for "
        "512-px SD 2.x-base single files.  [default: its scheduler config; for an SD 2.x single file "
        "v_prediction, as 768-px SD 2.x]",
    ),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", "-s", help="Random seed; the same seed gives the same result.")
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.  [default: auto: CUDA, "
                                "else MPS, else the CPU]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


class ManyArgumentsCommand(TyperCommand):
    """A command whose list argument's help shows the type of one value (``NAME <str>...``):
    typer writes the annotation (``NAME <list[str]>``), which reads as if one value were a list."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument and param.nargs == -1:
                param.__class__ = _ManyValues


class _ManyValues(TyperArgument):
    def display_type(self, ctx) -> str:
        one = typing.get_args(self.type_descriptor.annotation)
        return f"<{getattr(one[0], '__name__', 'str') if one else 'str'}>..."


def handle_errors(command):
    """The one error boundary: StcError -> 'Error: ...' on stderr, exit 1 (STC_DEBUG=1: traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StcError as exc:
            if os.environ.get("STC_DEBUG") == "1":
                raise
            code = getattr(exc, "exit_code", 1)
            label = "[bold red]Error:[/]" if code == 1 else "[bold yellow]Stopped:[/]"
            err.print(f"{label} {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None
        except OSError as exc:  # a file the library did not expect to fail: still one line, no traceback
            if os.environ.get("STC_DEBUG") == "1":
                raise
            where = f": {exc.filename}" if exc.filename else ""
            err.print(f"[bold red]Error:[/] {escape(exc.strerror or str(exc))}{escape(str(where))}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


# --------------------------------------------------------------------------- output helpers


def print_json(data) -> None:
    """Pretty JSON on stdout (``--json`` of ls, show, inspect)."""
    import json

    out.print_json(json.dumps(data, default=str))


def print_record(record: dict) -> None:
    """One JSON record per line on stdout (``--json`` of gen and grid)."""
    import json

    out.print(json.dumps(record, sort_keys=True), markup=False, highlight=False, emoji=False, soft_wrap=True)


PLAIN_PROGRESS_SECONDS = 30.0  # off a terminal, a progress line at least this often,
PLAIN_PROGRESS_FRACTION = 0.1  # ... at every further tenth of the work,
PLAIN_PROGRESS_QUIET = 5.0  # ... but never twice within this many seconds (and once at the end)
ETA_AFTER_STEPS = 3  # the time left is shown once this many steps have run after the first (warm-up) one


class progress_bar:
    """Progress of long work on stderr; yields the library's ``progress(done, total)`` callback.

    On a terminal a rich bar (elapsed, remaining); elsewhere (a log, CI, a pipe) a plain line
    at every tenth of the work (at most one per 5 seconds), at least every 30 seconds, and at
    the end, so a long export or render is never silent. ``fields(done, total)`` may add text (a loss) to each report.
    """

    def __init__(self, description: str, unit: str = "", fields=None):
        self.description, self.unit, self.fields = description, unit, fields

    def __enter__(self):
        import time

        self.started = self.last_time = time.monotonic()
        self.last_fraction = 0.0
        if err.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TextColumn("{task.fields[left]}"))
            self.live = Progress(*columns, console=err, transient=True)
            self.live.__enter__()
            self.task = self.live.add_task(self.description, total=None, extra="", left="")
        else:
            self.live = None
        self.first = None  # (time, done) at the first report: the first step's warm-up is not the pace
        return self.update

    def time_left(self, now: float, done: int, total: int) -> float | None:
        """Seconds left at the pace since the first report, or None until enough steps have run
        to tell (one step, with its warm-up, said "about 3h29m left" for a 20-minute run)."""
        if self.first is None:
            if done > 0:  # the pace counts from the end of the first step
                self.first = (now, done)
            return None
        since, done_then = self.first
        if done - done_then < ETA_AFTER_STEPS or done >= total or now <= since:
            return None
        return (now - since) / (done - done_then) * (total - done)

    def update(self, done: int, total: int) -> None:
        import time

        extra = self.fields(done, total) if self.fields else ""
        now = time.monotonic()
        seconds_left = self.time_left(now, done, total)
        if self.live is not None:
            left = f"{_duration(seconds_left)} left" if seconds_left is not None else ""
            self.live.update(self.task, completed=done, total=total, extra=extra, left=left)
            return
        fraction = done / total if total else 1.0
        since = now - self.last_time
        due = since >= PLAIN_PROGRESS_SECONDS or (
            fraction - self.last_fraction >= PLAIN_PROGRESS_FRACTION and since >= PLAIN_PROGRESS_QUIET)
        if done < total and not due:
            return
        self.last_time, self.last_fraction = now, fraction
        elapsed = now - self.started
        left = f", about {_duration(seconds_left)} left" if seconds_left is not None else ""
        unit = f" {self.unit}" if self.unit else ""
        err.print(f"{self.description}: {done}/{total}{unit} ({fraction:.0%}) {extra}".rstrip()
                  + f", {_duration(elapsed)} elapsed{left}", highlight=False, markup=False, soft_wrap=True)

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def quiet_libraries() -> None:
    """Silence the heavy libraries' info/warning chatter; our own messages say what matters.

    Cheap: it imports nothing (the libraries read these variables when they are imported), so
    commands can call it before validating their arguments.
    """
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def command_env(ctx: typer.Context, **given) -> Settings:
    """The settings a command passes to the library: the environment's, read once when ``stc``
    starts, with the global flags (``--threads``, ``--offline``) and the command's own ``given``
    ones (``prediction_type=``; None: not given) on top."""
    root = ctx.find_root().obj
    try:
        return (root if isinstance(root, Settings) else Settings.from_environment()).replace(**given)
    except StcError as exc:  # a bad value of the command's own option: one line, exit 1, as every value
        raise BadInput(str(exc)) from None


def open_registry(env: Settings | None = None):
    from ..store.registry import Registry

    return Registry((env or Settings.from_environment()).home)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"stc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
    threads: Annotated[
        Optional[int], typer.Option("--threads", help="CPU threads for torch (also STC_THREADS).  [default: "
                                    "1 for small models, else the free cores]")
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only models already on disk; never touch the network (also "
                           "HF_HUB_OFFLINE=1).")
    ] = False,
) -> None:
    """Personalize Stable Diffusion with neural space-time concepts.

    The default base model is STC_MODEL, else 'model:' in $STC_HOME/config.yaml, else
    stable-diffusion-v1-5/stable-diffusion-v1-5.
    """
    try:  # the environment is read and checked here, once, before any command starts its work
        if threads is not None and threads < 1:
            raise BadInput(f"--threads must be at least 1, got {threads}")
        ctx.obj = Settings.from_environment(threads=threads, offline=True if offline else None)
    except StcError as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None

