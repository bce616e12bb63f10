"""``stc import`` of a concept folder of another registry (a copy, a backup, a run rescued from a
full disk), or of the top folder of a registry holding one concept (``<name>-rescued-stepN``):
the concept as it is, with every file it has."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from .common import Imported, ImportRequest, concept_name

CONCEPT_FILE = "concept.yaml"
CONCEPTS = "concepts"  # a registry's folder of concept folders


def concept_folder(path: Path) -> Path:
    """``path`` when it is a concept folder; for the top folder of a registry, its one concept's."""
    if (path / CONCEPT_FILE).is_file():
        return path
    found = sorted(folder for folder in (path / CONCEPTS).iterdir() if (folder / CONCEPT_FILE).is_file())
    if len(found) > 1:
        shown = ", ".join(str(folder) for folder in found[:5]) + (", …" if len(found) > 5 else "")
        raise BadInput(f"{path} is a registry of {len(found)} concepts; import one of its concept folders: {shown}")
    if not found:
        raise BadInput(f"{path} is a registry without concepts; there is nothing to import")
    return found[0]


def read(request: ImportRequest) -> Imported:
    """The concept as it is, with every file it has (metrics, previews, a training checkpoint: an
    incomplete concept stays resumable); ``--model`` and ``--name`` may change it."""
    import dataclasses

    from ..store.conceptio import load_mapper
    from ..store.registry import concept_files, read_concept

    folder = concept_folder(request.path)
    concept = read_concept(folder)
    mapper = load_mapper(concept)  # its weights checked against concept.yaml
    changes = {"name": concept_name(request.name, concept.name), "created": concept.created,
               "base_model": request.model or concept.base_model}
    if request.init:
        changes["initializer"] = request.init
    files = concept_files(folder)
    return Imported(dataclasses.replace(concept, **changes, path=None), mapper, "stc-concept", files=files)
