"""stc comfyui."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from ._base import app, command_env, err, handle_errors, open_registry, out


@app.command("comfyui", help=(
    "Install stc's ComfyUI nodes into a ComfyUI folder (custom_nodes/stc_neti) and export concepts into its "
    "models/stc_concepts; prints the written paths.\n\nThe nodes render a concept at full strength (every "
    "timestep, layer, rank and the textual bypass) with any ComfyUI sampler; they need torch, safetensors and "
    "ComfyUI, not stc. Running it again updates the nodes."
))
@handle_errors
def comfyui(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="The ComfyUI folder (it has custom_nodes and models).",
                                           metavar="COMFYUI", show_default=False)],
    concepts: Annotated[Optional[list[str]], typer.Option(
        "--concept", "-c", metavar="NAME", show_default=False,
        help="A concept to export into models/stc_concepts as NAME.safetensors (repeat for several).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace concept files already there.")] = False,
) -> None:
    from ..exchange.formats import export_concept
    from ..hosts.comfyui import install

    env = command_env(ctx)
    registry = open_registry(env) if concepts else None
    for name in concepts or []:
        registry.load(name)  # every name checked before anything is written
    pack, concept_folder = install(folder)
    out.print(str(pack), soft_wrap=True, highlight=False)
    for name in concepts or []:
        result = export_concept(registry, name, "concept-file", out=concept_folder, force=force, env=env)
        out.print(str(result.paths[0]), soft_wrap=True, highlight=False)
    err.print(Text(f"Restart ComfyUI; the nodes are under 'stc' (stc Load Concept, stc Text Encode). Concept files "
                   f"go into {concept_folder}."), soft_wrap=True)
