"""stc export, stc import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from ..exchange.common import FAST, THOROUGH
from ..exchange.registry import export_formats
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


def warn(message: str) -> None:
    err.print(Text.assemble(("Warning:", "yellow"), " ", message), soft_wrap=True)


@app.command("export", help=(
    "Export a concept for other tools; prints the written paths. Formats (each keeps and loses):\n\n"
    + "\n\n".join(f"- {f.name}: keeps {f.keeps}; loses {f.loses}." for f in export_formats().values())
    + "\n\nSDXL concepts: ti and a1111 write the same file, NAME.safetensors (clip_l + clip_g), at the same "
    "path.\n\nOther tools trigger a ti/a1111 file by its file name (A1111 webui: NAME; ComfyUI: embedding:NAME; "
    "kohya: NAME, NAME1, NAME2, ... for more vectors; diffusers: the token= passed): a warning says when NAME is a "
    "word of the base model's vocabulary or can meet another concept's name in kohya's numbering."
))
@handle_errors
def export(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Concept to export.", metavar="NAME", show_default=False)],
    format_name: Annotated[
        str, typer.Option("--format", "-f", help=f"One of: {', '.join(export_formats())}.", show_default=False)
    ],
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Folder to write into.  [default: the current folder]")
    ] = None,
    rank: Annotated[
        Optional[int], typer.Option("--rank", "-r", help="ti/a1111: the rank whose outputs are distilled; "
                                    "diffusers: the default rank of the export.  [default: full]")
    ] = None,
    vectors: Annotated[int, typer.Option("--vectors", help="ti/a1111: number of vectors to distil.")] = 1,
    thorough: Annotated[bool, typer.Option(
        "--thorough", help=f"ti/a1111: the thorough fit ({THOROUGH[0]} samples, {THOROUGH[1]} steps: minutes) "
        f"instead of the fast one ({FAST[0]} samples, {FAST[1]} steps: seconds).")] = False,
    samples: Annotated[Optional[int], typer.Option(
        "--samples", show_default=False, help="ti/a1111: (noise, t, caption) samples the vectors are fitted on; "
        "as many more (64 to 256) measure the fidelity (overrides --thorough's).")] = None,
    fit_steps: Annotated[Optional[int], typer.Option(
        "--fit-steps", show_default=False, help="ti/a1111: optimisation steps of the fit (overrides --thorough's).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = None,
    prediction_type: PredictionTypeOpt = None,
) -> None:
    from ..exchange.registry import check_format

    export_format = check_format(format_name)
    env = command_env(ctx, prediction_type=prediction_type)
    quiet_libraries()
    from contextlib import nullcontext

    from ..exchange.formats import export_concept

    distils = export_format.distils
    with progress_bar(f"distilling {name} into {vectors} vector(s)") if distils else nullcontext() as progress:
        result = export_concept(
            open_registry(env), name, format_name, out=out_dir, rank=rank, vectors=vectors, force=force, model=model,
            model_config=str(model_config) if model_config else None, device=device, progress=progress,
            on_status=lambda message: err.print(Text(message, style="dim")), samples=samples, fit_steps=fit_steps,
            thorough=thorough, env=env,
        )
    err.print(Text(f"Exported <{name}> as {export_format.name}: keeps {export_format.keeps}; "
                   f"loses {export_format.loses}."), soft_wrap=True)
    if result.exact:
        err.print(Text(f"{name} is a textual-inversion embedding: its own vectors were written, exactly."),
                  soft_wrap=True)
    if result.fidelity is not None:
        fidelity = result.fidelity
        err.print(Text(
            f"Fidelity (relative denoiser error vs the concept on {fidelity.samples} held-out samples, mean ± "
            f"standard error, lower is better): distilled {fidelity.distilled:.4f} ± {fidelity.distilled_se:.4f}, "
            f"plain average {fidelity.average:.4f} ± {fidelity.average_se:.4f}, initializer word "
            f"{fidelity.initializer:.4f} ± {fidelity.initializer_se:.4f}"
        ), soft_wrap=True)
        err.print(Text(f"Written: {fidelity.decision()}."), soft_wrap=True)
    for note in result.notes:
        err.print(Text(f"Note: {note}", style="dim"), soft_wrap=True)
    for warning in result.warnings:
        warn(warning)
    for path in result.paths:
        out.print(Text(str(path)), soft_wrap=True)


@app.command("import")
@handle_errors
def import_(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(
        help="A reference NeTI *-mapper.pt, a textual-inversion embedding (.safetensors, .pt, .bin) or a folder "
        "written by 'stc export --format diffusers'.", show_default=False)],
    name: Annotated[Optional[str], typer.Option("--name", help="Concept name.  [default: from the file]")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Initializer word to record.  [default: from "
                                                "the file, else 'object']")] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
) -> None:
    """Import a concept into the registry; pickled files are read without running their code."""
    quiet_libraries()
    from ..exchange.formats import import_concept

    env = command_env(ctx)
    result = import_concept(open_registry(env), path, name=name, init=init, model=model, env=env,
                            model_config=str(model_config) if model_config else None)
    concept = result.concept
    for note in result.notes:
        err.print(Text(f"Note: {note}", style="dim"), soft_wrap=True)
    for warning in result.warnings:
        warn(warning)
    err.print(Text(f"Imported {concept.token} ({result.source_format}) for {concept.base_model}. "
                   f'Use it: stc gen "{concept.token} on the beach"'), soft_wrap=True)
    out.print(Text(str(concept.path)), soft_wrap=True)
