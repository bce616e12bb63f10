"""stc gen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._base import (
    DeviceOpt,
    JsonOpt,
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
def gen(
    prompt: Annotated[str, typer.Argument(help="Prompt; <name> uses a concept, <name:8> sets its rank.")],
    rank: Annotated[
        int,
        typer.Option(
            "--rank",
            "-r",
            help="Truncation rank 1-128 for every concept: small = more editable, 128 = full fidelity.",
        ),
    ] = 128,
    seed: SeedOpt = 0,
    num_images: Annotated[
        int, typer.Option("-n", "--num-images", help="Images to render (seeds S, S+1, ...).")
    ] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per UNet batch.")] = 4,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 50,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 7.5,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    width: Annotated[
        Optional[int], typer.Option("--width", help="Width in px (default: the model's).")
    ] = None,
    height: Annotated[
        Optional[int], typer.Option("--height", help="Height in px (default: the model's).")
    ] = None,
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
    from ..generation import RenderSettings, parse_prompt

    if num_images < 1:
        raise typer.BadParameter("must be at least 1", param_hint="-n")
    settings = RenderSettings(
        steps=steps,
        cfg=cfg,
        width=width,
        height=height,
        scheduler=scheduler,
        negative=negative,
        rank=rank,
        batch_size=batch_size,
    )
    parse_prompt(prompt)  # bad inline ranks fail before anything loads
    quiet_libraries()
    from ..generation import Renderer, choose_model, load_concepts_for, save_png
    from ..models import load_base_model

    registry = open_registry()
    concepts = load_concepts_for([prompt], registry)
    if not concepts:
        err.print("[dim]No <concept> in the prompt: rendering plain Stable Diffusion.[/]")
    spec = choose_model(concepts, model)
    with err.status(f"loading {spec}"):
        base = load_base_model(
            spec, device=device, dtype=dtype, config=str(model_config) if model_config else None
        )
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
