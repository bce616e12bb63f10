"""Registry commands: stc ls."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ._base import (
    JsonOpt,
    app,
    err,
    handle_errors,
    open_registry,
    out,
)


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
    registry = open_registry()
    records = []
    for name, concept, problem in registry.scan():
        if problem is not None:
            err.print(f"[yellow]Warning:[/] {name}: {problem}", highlight=False)
            continue
        training = concept.training
        records.append(
            {
                "name": concept.name,
                "token": concept.token,
                "base_model": concept.base_model,
                "steps": training.get("steps_done", training.get("steps")),
                "size": _size_of(concept.path),
                "created": concept.created,
            }
        )
    if as_json:
        out.print_json(json.dumps(records))
        return
    if not records:
        err.print(
            f"No concepts in {registry.concepts_dir} yet. Train one:\n"
            "  stc train ./photos --name mydog --init dog",
            highlight=False,
        )
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "base model", "steps", "size", "created"):
        table.add_column(column, justify="right" if column in ("steps", "size") else "left")
    for record in records:
        table.add_row(
            record["name"],
            record["base_model"],
            str(record["steps"]),
            _human(record["size"]),
            record["created"].replace("T", " ")[:16],
        )
    out.print(table)
