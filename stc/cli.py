"""The ``stc`` command line: parse, call the library, render with rich.

Heavy libraries (torch, diffusers, transformers) are imported inside commands, so
``stc --help`` and ``stc ls`` answer instantly.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import StcError

app = typer.Typer(
    name="stc",
    help="Personalize Stable Diffusion with neural space-time concepts (NeTI): train a concept "
    "from a few photos, keep it in a local registry, render it at any truncation rank.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

# Shared option aliases --------------------------------------------------------------------
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m",
        help="Base model: a hub id, a local diffusers folder, a .safetensors file, or builtin:tiny.",
    ),
]
ModelConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--model-config", help="For a single-file --model: a local diffusers folder with its configs."),
]
SeedOpt = Annotated[int, typer.Option("--seed", "-s", help="Random seed; the same seed gives the same result.")]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="cpu, cuda or mps (default: the best available).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def handle_errors(command):
    """The one error boundary: StcError -> 'Error: ...' on stderr, exit 1 (STC_DEBUG=1: traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StcError as exc:
            if os.environ.get("STC_DEBUG") == "1":
                raise
            err.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def _quiet_libraries() -> None:
    """Silence the heavy libraries' info/warning chatter; our own messages say what matters."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def _registry():
    from .registry import Registry

    return Registry()


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"stc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Personalize Stable Diffusion with neural space-time concepts."""


# train -----------------------------------------------------------------------------------


@app.command()
@handle_errors
def train(
    photos: Annotated[Path, typer.Argument(help="Folder with 3-6 photos of the subject (never modified).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Concept name; use it in prompts as <name>.")],
    init: Annotated[
        Optional[str],
        typer.Option("--init", help="Initializer (super-category) word, one token: e.g. dog, cat, toy. "
                     "Default: object (painting for --kind style)."),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps (reference: 1000).")] = 1000,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    seed: SeedOpt = 0,
    kind: Annotated[str, typer.Option("--kind", help="object or style: chooses the caption templates.")] = "object",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per micro-batch.")] = 2,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 4,
    lr: Annotated[float, typer.Option("--lr", help="Base learning rate (scaled by batch x accumulation).")] = 1e-3,
    resolution: Annotated[
        Optional[int], typer.Option("--resolution", help="Training image size (default: the model's).")
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Train a concept from a folder of photos and save it in the registry."""
    from .models import DEFAULT_MODEL
    from .registry import validate_name
    from .training import TrainConfig

    validate_name(name)
    config = TrainConfig(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, resolution=resolution,
        seed=seed, kind=kind, initializer=init,
    )
    _quiet_libraries()
    from .training import train_concept

    with _training_progress() as on_step:
        result = train_concept(
            photos, name, model or DEFAULT_MODEL, config, registry=_registry(), device=device,
            model_config=str(model_config) if model_config else None, on_step=on_step,
            on_warning=lambda message: err.print(f"[yellow]Warning:[/] {message}", highlight=False),
            on_status=lambda message: err.print(f"[dim]{message}[/]", highlight=False),
        )
    concept = result.concept
    metrics = concept.metrics
    err.print(
        f"Trained [bold]{concept.token}[/] in {metrics['seconds']:.1f}s: loss {metrics['final_loss']:.4f}, "
        f"eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}",
        highlight=False,
    )
    err.print(f'Use it: stc gen "{concept.token} on the beach" --rank 8', highlight=False)
    out.print(str(concept.path), highlight=False, soft_wrap=True)


class _training_progress:
    """A rich progress bar on stderr (step, smoothed loss, it/s, ETA); yields the callback."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self.task = None
        self.smoothed = None
        self.progress.__enter__()
        return self.update

    def update(self, step: int, total: int, loss: float) -> None:
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, loss="-", rate="")
        task = self.progress.tasks[self.task]
        speed = task.speed
        self.progress.update(
            self.task, completed=step, loss=f"{self.smoothed:.4f}", rate=f"{speed:.2f} it/s" if speed else ""
        )

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False


# gen -------------------------------------------------------------------------------------


@app.command()
@handle_errors
def gen(
    prompt: Annotated[str, typer.Argument(help='Prompt; <name> uses a concept, <name:8> sets its rank.')],
    rank: Annotated[
        int, typer.Option("--rank", "-r", help="Truncation rank 1-128 for every concept: small = more "
                          "editable, 128 = full fidelity.")
    ] = 128,
    seed: SeedOpt = 0,
    num_images: Annotated[int, typer.Option("-n", "--num-images", help="Images to render (seeds S, S+1, ...).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per UNet batch.")] = 4,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 50,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 7.5,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    width: Annotated[Optional[int], typer.Option("--width", help="Width in px (default: the model's).")] = None,
    height: Annotated[Optional[int], typer.Option("--height", help="Height in px (default: the model's).")] = None,
    scheduler: Annotated[str, typer.Option("--scheduler", help="dpm, ddim, euler or pndm.")] = "dpm",
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = None,
    dtype: Annotated[
        Optional[str], typer.Option("--dtype", help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU).")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files.")] = Path("stc-out"),
    as_json: JsonOpt = False,
) -> None:
    """Render images of a prompt; prints the paths of the PNG files."""
    from .generation import RenderSettings, parse_prompt

    if num_images < 1:
        raise typer.BadParameter("must be at least 1", param_hint="-n")
    settings = RenderSettings(
        steps=steps, cfg=cfg, width=width, height=height, scheduler=scheduler, negative=negative,
        rank=rank, batch_size=batch_size,
    )
    parse_prompt(prompt)  # bad inline ranks fail before anything loads
    _quiet_libraries()
    from .generation import Renderer, choose_model, load_concepts_for, save_png
    from .models import load_base_model

    registry = _registry()
    concepts = load_concepts_for([prompt], registry)
    if not concepts:
        err.print("[dim]No <concept> in the prompt: rendering plain Stable Diffusion.[/]")
    spec = choose_model(concepts, model)
    with err.status(f"loading {spec}"):
        base = load_base_model(spec, device=device, dtype=dtype, config=str(model_config) if model_config else None)
        renderer = Renderer(base, concepts)
    seeds = list(range(seed, seed + num_images))
    with err.status(f"rendering {num_images} image(s)"):
        images = renderer.render(prompt, seeds, settings)
    for rendered in images:
        path = save_png(rendered, out_dir)
        if as_json:
            out.print_json(json.dumps({"path": str(path), **rendered.metadata}))
        else:
            out.print(str(path), highlight=False, soft_wrap=True)


# ls --------------------------------------------------------------------------------------


def _size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


@app.command("ls")
@handle_errors
def ls(as_json: JsonOpt = False) -> None:
    """List the concepts in the registry."""
    registry = _registry()
    records = []
    for name, concept, problem in registry.scan():
        if problem is not None:
            err.print(f"[yellow]Warning:[/] {name}: {problem}", highlight=False)
            continue
        training = concept.training
        records.append({
            "name": concept.name,
            "token": concept.token,
            "base_model": concept.base_model,
            "steps": training.get("steps_done", training.get("steps")),
            "size": _size_of(concept.path),
            "created": concept.created,
        })
    if as_json:
        out.print_json(json.dumps(records))
        return
    if not records:
        err.print(
            f"No concepts in {registry.concepts_dir} yet. Train one:\n"
            "  stc train ./photos --name mydog --init dog", highlight=False,
        )
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "base model", "steps", "size", "created"):
        table.add_column(column, justify="right" if column in ("steps", "size") else "left")
    for record in records:
        table.add_row(
            record["name"], record["base_model"], str(record["steps"]), _human(record["size"]),
            record["created"].replace("T", " ")[:16],
        )
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
