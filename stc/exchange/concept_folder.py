"""``stc import`` of a concept folder of another registry (a copy, a backup, a run rescued from a
full disk): the concept as it is, with every file it has."""

from __future__ import annotations

from .common import Imported, ImportRequest, concept_name


def read(request: ImportRequest) -> Imported:
    """The concept as it is, with every file it has (metrics, previews, a training checkpoint: an
    incomplete concept stays resumable); ``--model`` and ``--name`` may change it."""
    import dataclasses

    from ..store.conceptio import load_mapper
    from ..store.registry import concept_files, read_concept

    concept = read_concept(request.path)
    mapper = load_mapper(concept)  # its weights checked against concept.yaml
    changes = {"name": concept_name(request.name, concept.name), "created": concept.created,
               "base_model": request.model or concept.base_model}
    if request.init:
        changes["initializer"] = request.init
    files = concept_files(request.path)
    return Imported(dataclasses.replace(concept, **changes, path=None), mapper, "stc-concept", files=files)
