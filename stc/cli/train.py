"""stc train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import BadInput
from ..train.config import TrainConfig
from ._base import (
    DeviceOpt,
    ModelConfigOpt,
    ModelOpt,
    PredictionTypeOpt,
    app,
    command_env,
    err,
    handle_errors,
    open_registry,
    out,
    progress_bar,
    quiet_libraries,
)

_DEFAULTS = TrainConfig()


def _hyper_parameter(flag: str, help: str, *aliases: str, field: str | None = None, default=None):
    """A hyper-parameter option; its default is shown from TrainConfig (defined there only)."""
    field = field or flag.split("/")[0].removeprefix("--").replace("-", "_")
    default = getattr(_DEFAULTS, field) if default is None else default
    if isinstance(default, bool):
        default = "on" if default else "off"
    shown = f"  [default: {default}]" if default is not None else ""
    return typer.Option(flag, *aliases, help=f"{help}.{shown}", show_default=False,
                        rich_help_panel="Hyper-parameters (reference defaults)")


@app.command()
@handle_errors
def train(
    ctx: typer.Context,
    photos: Annotated[
        Optional[Path], typer.Argument(help="Folder with 3-6 photos of the subject (only read, never modified).")
    ] = None,
    name: Annotated[
        Optional[str], typer.Option("--name", help="Concept name; use it in prompts as <name>.")
    ] = None,
    resume: Annotated[
        Optional[str],
        typer.Option("--resume", help="Continue the interrupted concept NAME from its checkpoint "
                     "(to its planned --steps unless --steps is given)."),
    ] = None,
    init: Annotated[
        Optional[str],
        typer.Option("--init", help="Initializer (super-category) word, one token: e.g. dog, cat, toy.  "
                     "[default: object; painting for --kind style]"),
    ] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="object or style: the caption templates.")] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    config_file: Annotated[
        Optional[Path], typer.Option("--config", help="YAML file of settings (keys as below, e.g. lr: 0.002); "
                                     "flags override it.")
    ] = None,
    device: DeviceOpt = None,
    prediction_type: PredictionTypeOpt = None,
    force_size: Annotated[
        bool, typer.Option("--force-size", help="Train at a --resolution far outside the model's range (more "
                           "than 8x its own), which is otherwise refused with the memory it would take.")
    ] = False,
    save_every: Annotated[
        Optional[int], typer.Option("--save-every", show_default=False, help="Checkpoint every N steps (0: only at "
                                    f"the end and on Ctrl-C).  [default: {_DEFAULTS.save_every}]")
    ] = None,
    preview_every: Annotated[
        Optional[int], typer.Option("--preview-every", show_default=False, help="Render preview images every N "
                                    "steps into the concept folder (0: only the final preview).  [default: "
                                    f"{_DEFAULTS.preview_every}]")
    ] = None,
    steps: Annotated[Optional[int], _hyper_parameter("--steps", "Optimizer steps")] = None,
    seed: Annotated[Optional[int], _hyper_parameter("--seed", "Random seed; same seed, same concept", "-s")] = None,
    batch_size: Annotated[Optional[int], _hyper_parameter("--batch-size", "Images per micro-batch")] = None,
    grad_accum: Annotated[Optional[int], _hyper_parameter("--grad-accum", "Micro-batches per optimizer step")] = None,
    lr: Annotated[Optional[float], _hyper_parameter("--lr", "Base learning rate")] = None,
    scale_lr: Annotated[
        Optional[bool], _hyper_parameter("--scale-lr/--no-scale-lr", "Scale the LR by batch x accumulation x processes")
    ] = None,
    adam_beta1: Annotated[Optional[float], _hyper_parameter("--adam-beta1", "AdamW beta1")] = None,
    adam_beta2: Annotated[Optional[float], _hyper_parameter("--adam-beta2", "AdamW beta2")] = None,
    adam_weight_decay: Annotated[
        Optional[float], _hyper_parameter("--weight-decay", "AdamW weight decay", field="adam_weight_decay")
    ] = None,
    adam_epsilon: Annotated[Optional[float], _hyper_parameter("--adam-epsilon", "AdamW epsilon")] = None,
    resolution: Annotated[
        Optional[int], _hyper_parameter("--resolution", "Training image size", default="the model's, 512 for SD")
    ] = None,
    bypass: Annotated[
        Optional[bool], _hyper_parameter("--bypass/--no-bypass", "Textual bypass; off for ablations")
    ] = None,
    nested_dropout: Annotated[
        Optional[bool], _hyper_parameter("--nested-dropout/--no-nested-dropout", "Nested dropout; off for ablations")
    ] = None,
    nested_dropout_prob: Annotated[
        Optional[float], _hyper_parameter("--nested-dropout-prob", "Probability per mapper call")
    ] = None,
    mixed_precision: Annotated[
        Optional[str], _hyper_parameter("--mixed-precision", "no, fp16 or bf16 for the frozen models; the mapper "
                                        "stays fp32")
    ] = None,
    gradient_checkpointing: Annotated[
        Optional[bool], _hyper_parameter("--gradient-checkpointing/--no-gradient-checkpointing",
                                         "Trade compute for memory")
    ] = None,
) -> None:
    """Train a concept from a folder of photos and save it in the registry.

    Ctrl-C saves a checkpoint; continue with: stc train --resume NAME
    """
    from ..names import validate_name

    given = _given_settings(ctx.params)
    env = command_env(ctx, prediction_type=prediction_type)
    if resume is not None:
        _resume(resume, photos, given, config_file, model, device, model_config, env)
        return
    if name is None or photos is None:
        raise BadInput("give the photos folder and --name (stc train PHOTOS --name NAME), or --resume NAME")
    validate_name(name)
    config = TrainConfig.from_file(config_file, given) if config_file else TrainConfig(**given)
    quiet_libraries()
    from ..train.training import train_concept

    with _training_progress(env) as callbacks:
        result = train_concept(
            photos, name, model, config, registry=open_registry(env), device=device,
            model_config=str(model_config) if model_config else None, callbacks=callbacks, env=env,
            force_size=force_size,
        )
    _summary(result.concept, env)


RESUMABLE = {"steps", "save_every", "preview_every"}


def _given_settings(params: dict) -> dict:
    """The TrainConfig fields the command line set: every option named as a field (``--init`` for
    ``initializer``), when given."""
    from dataclasses import fields

    from ..train.config import ALIASES

    option_of = {field: option.replace("-", "_") for option, field in ALIASES.items()}
    values = {item.name: params[item.name] if item.name in params else params.get(option_of.get(item.name))
              for item in fields(TrainConfig)}
    return {name: value for name, value in values.items() if value is not None}


def _resume(name, photos, given, config_file, model, device, model_config, env) -> None:
    changed = sorted(set(given) - RESUMABLE) + (["--config"] if config_file else []) + (["--model"] if model else [])
    if changed:
        raise BadInput(
            f"--resume: cannot change {', '.join(changed)} when resuming; only --steps, --save-every and "
            "--preview-every"
        )
    quiet_libraries()
    from ..train.training import resume_training

    with _training_progress(env) as callbacks:
        result = resume_training(
            name, steps=given.get("steps"), photos_dir=photos, save_every=given.get("save_every"),
            preview_every=given.get("preview_every"), registry=open_registry(env), device=device,
            model_config=str(model_config) if model_config else None, callbacks=callbacks, env=env,
        )
    _summary(result.concept, env)


def _summary(concept, env) -> None:
    if not env.is_main_process:  # under torchrun / accelerate launch only rank 0 talks
        return
    metrics = concept.metrics
    before = f"{metrics.eval_loss_before:.4f} -> " if metrics.eval_loss_before is not None else ""
    err.print(
        f"Trained [bold]{concept.token}[/] for {concept.steps_done} steps in {metrics.seconds:.1f}s: "
        f"loss {metrics.final_loss:.4f}, eval loss {before}{metrics.eval_loss_after:.4f}",
        highlight=False,
    )
    from ..train.training import suggested_prompt

    err.print(f'Use it: stc gen "{suggested_prompt(concept)}" --rank 8', highlight=False)
    out.print(str(concept.path), highlight=False, soft_wrap=True)


class _training_progress:
    """Training progress on stderr (step, smoothed loss, elapsed, ETA; see ``progress_bar``);
    yields TrainCallbacks. Under torchrun / accelerate launch only rank 0 talks."""

    def __init__(self, env):
        self.main = env.is_main_process

    def __enter__(self):
        from ..train.training import TrainCallbacks

        self.smoothed = None
        self.bar = progress_bar("training", "steps", fields=lambda done, total: f"loss {self.smoothed:.4f}")
        self.report = self.bar.__enter__() if self.main else None
        say = err.print if self.main else (lambda *args, **kwargs: None)
        return TrainCallbacks(
            on_step=self.update,
            on_warning=lambda message: say(f"[yellow]Warning:[/] {escape(message)}", highlight=False, soft_wrap=True),
            on_status=lambda message: say(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True),
        )

    def update(self, step: int, total: int, loss: float) -> None:
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        if self.report is not None:
            self.report(step, total)

    def __exit__(self, *exc):
        if self.main:
            self.bar.__exit__(*exc)
        return False
