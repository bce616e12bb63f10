"""stc train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._base import (
    DeviceOpt,
    ModelConfigOpt,
    ModelOpt,
    SeedOpt,
    app,
    err,
    handle_errors,
    open_registry,
    out,
    quiet_libraries,
)


@app.command()
@handle_errors
def train(
    photos: Annotated[Path, typer.Argument(help="Folder with 3-6 photos of the subject (never modified).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Concept name; use it in prompts as <name>.")],
    init: Annotated[
        Optional[str],
        typer.Option(
            "--init",
            help="Initializer (super-category) word, one token: e.g. dog, cat, toy. "
            "Default: object (painting for --kind style).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps (reference: 1000).")] = 1000,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    seed: SeedOpt = 0,
    kind: Annotated[
        str, typer.Option("--kind", help="object or style: chooses the caption templates.")
    ] = "object",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per micro-batch.")] = 2,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 4,
    lr: Annotated[
        float, typer.Option("--lr", help="Base learning rate (scaled by batch x accumulation).")
    ] = 1e-3,
    resolution: Annotated[
        Optional[int], typer.Option("--resolution", help="Training image size (default: the model's).")
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Train a concept from a folder of photos and save it in the registry."""
    from ..models import DEFAULT_MODEL
    from ..registry import validate_name
    from ..training import TrainConfig

    validate_name(name)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        resolution=resolution,
        seed=seed,
        kind=kind,
        initializer=init,
    )
    quiet_libraries()
    from ..training import train_concept

    with _training_progress() as on_step:
        result = train_concept(
            photos,
            name,
            model or DEFAULT_MODEL,
            config,
            registry=open_registry(),
            device=device,
            model_config=str(model_config) if model_config else None,
            on_step=on_step,
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
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

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
