"""``a1111``: the A1111 webui's native embedding ``.pt`` (``string_to_param`` {'*': [n, D]}), which
its safe loader accepts; the webui reads SDXL embeddings from the ti safetensors layout (its
``.pt`` holds one tensor), so an SDXL concept's a1111 export is that file. ``stc import`` reads
these files with the other embeddings (``ti.py``)."""

from __future__ import annotations

from pathlib import Path

from ..outputs import staged
from .common import ExportJob, ExportResult
from .ti import embedding_vectors, write_ti
from .torchfiles import portable_torch_save

A1111_STAR_TOKEN = 265  # CLIP's id of '*', the key every A1111 embedding uses


def targets(name: str, out: Path, backbone) -> list[Path]:
    return [out / (f"{name}.pt" if backbone.a1111_pt else f"{name}.safetensors")]


def export(job: ExportJob, result: ExportResult) -> None:
    vectors, spec = embedding_vectors(job, result)
    if job.backbone.a1111_pt:
        write_a1111(vectors, job.paths[0], job.concept.name, job.concept.steps_done or 0, spec)
    else:
        write_ti(vectors, job.paths[0], spec, job.backbone)
        result.notes.append(f"for {job.backbone.label}, a1111 and ti are the same file: {job.paths[0].name} "
                            f"({' + '.join(job.backbone.ti_keys)})")


def a1111_embedding(vectors, name: str, steps: int, checkpoint_name: str) -> dict:
    """The webui's native embedding dict: tensors, strings and ints only."""
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": vectors.detach().float().cpu().clone()},
        "name": name,
        "step": int(steps),
        "sd_checkpoint": "",  # the webui's short hash of the base checkpoint: unknown here
        "sd_checkpoint_name": checkpoint_name,
    }


def write_a1111(vectors, path: Path, name: str, steps: int, checkpoint_name: str) -> None:
    with staged(path) as temporary:
        temporary.write_bytes(portable_torch_save(a1111_embedding(vectors, name, steps, checkpoint_name), name))
