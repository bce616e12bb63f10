"""``stc export NAME --format concept-file``: a concept as one ``.safetensors`` file a host loads
without stc (the ComfyUI nodes of ``stc/hosts/comfyui``; an A1111/Forge or InvokeAI integration
would read the same), and back (``stc import``).

The file (format ``stc-concept-file/1``, docs/concept-format.md) holds the mapper's tensors as
the concept's ``mapper.safetensors`` has them (fp32, bit for bit) and, in the safetensors header's
metadata (strings; JSON where noted), everything that uses them: the mapper config, the UNet's
layer names in execution order, the placeholder token, the initializer word, the base model and
its family, and how each text encoder's output is read (the family's backbone readings).
``accepts`` tells it from a textual-inversion ``.safetensors`` by the header alone (no torch).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .. import __version__
from ..errors import BadInput, StcError
from ..store.concept import Concept

FILE_FORMAT = "stc-concept-file/1"
SUFFIX = ".safetensors"
MAX_HEADER = 16 * 1024 * 1024  # safetensors' own limit on a header (100 MB) is larger; ours are a few kB
# metadata keys a reader requires: name -> JSON-decoded (True) or plain string (False)
REQUIRED = {"format": False, "name": False, "token": False, "initializer": False, "base_model": False,
            "family": False, "mapper": True, "layer_names": True, "text_encoders": True}


def header_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file's header (None: not a safetensors file), read
    from its first bytes without loading any tensor."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                return None
            (size,) = struct.unpack("<Q", size_bytes)
            if size > MAX_HEADER:
                return None
            header = json.loads(handle.read(size).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):  # a lying header is no concept file
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def is_concept_file(path: Path) -> bool:
    """Whether ``path`` is an stc single-file concept (any version): its header says so."""
    if not (path.is_file() and path.suffix == SUFFIX):
        return False
    metadata = header_metadata(path)
    return bool(metadata) and str(metadata.get("format", "")).startswith("stc-concept-file/")


# --------------------------------------------------------------------------- writing


def targets(name: str, out: Path, backbone) -> list[Path]:
    return [out / f"{name}{SUFFIX}"]


def export(job, result) -> None:
    from ..outputs import staged
    from ..store.conceptio import read_state_dict

    data = file_bytes(job.concept, read_state_dict(job.concept), job.backbone, rank=job.rank)
    with staged(job.paths[0]) as temporary:
        temporary.write_bytes(data)


def file_metadata(concept: Concept, backbone, rank: int | None = None) -> dict[str, str]:
    """The header metadata of ``concept``'s file (``backbone``: its family, stc.models.backbones)."""
    import dataclasses

    return {
        "format": FILE_FORMAT,
        "stc_version": __version__,
        "name": concept.name,
        "token": concept.token,
        "initializer": concept.initializer,
        "base_model": concept.base_model,
        "family": backbone.name,  # SD 1.x "sd1", SD 2.x "sd2", SDXL "sdxl" (or a test layout's name)
        "family_label": backbone.label,
        "mapper": json.dumps(concept.mapper, sort_keys=True),  # MapperConfig
        "layer_names": json.dumps(list(concept.layer_names)),  # the UNet's cross-attention layers: layer l
        # per text encoder, in context order: "final" / "penultimate" state, which one pools (SDXL's
        # second); the UNet's pooled embedding at step t is the mean of the pooled ones over layers
        "text_encoders": json.dumps([dataclasses.asdict(reading) for reading in backbone.readings]),
        "pooled": "mean over layers" if any(reading.pooled for reading in backbone.readings) else "none",
        # per text encoder: how many transformer layers its "final" state comes after (SD 2.x: 23 of
        # OpenCLIP's 24; a host whose encoder keeps all 24 runs the first 23); null: unknown (a test layout)
        "text_encoder_layers": json.dumps(encoder_layers(backbone)),
        "rank": json.dumps(rank),  # a host's default truncation rank; null = full
        "rank_max": json.dumps(concept.rank_max),
        "created": concept.created,
        "base_fingerprint": concept.base_fingerprint,
        "training": json.dumps(concept.training.to_dict(), sort_keys=True),
        "metrics": json.dumps(concept.metrics.to_dict(), sort_keys=True),
    }


def encoder_layers(backbone) -> list[int | None]:
    """Each text encoder's transformer layers in the family's shipped configs (None: no config)."""
    counts = []
    for reading in backbone.readings:
        path = backbone.config_dir / reading.component / "config.json"
        try:
            counts.append(int(json.loads(path.read_text(encoding="utf-8"))["num_hidden_layers"]))
        except (OSError, ValueError, KeyError):
            counts.append(None)
    return counts


def file_bytes(concept: Concept, state_dict: dict, backbone, rank: int | None = None) -> bytes:
    """The single file of ``concept`` with the tensors ``state_dict`` (its mapper's, fp32)."""
    from safetensors.torch import save

    from ..render.prompts import check_rank

    if rank is not None:
        check_rank(concept.name, rank, concept.rank_max)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    return save(tensors, metadata=file_metadata(concept, backbone, rank))


# --------------------------------------------------------------------------- reading


def read_concept_file(path: Path) -> tuple[dict, dict]:
    """The decoded metadata and the tensors of a single-file concept, checked (``BadInput``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    metadata = header_metadata(path)
    if metadata is None:
        raise BadInput(f"{path} is not a readable safetensors file")
    found = metadata.get("format")
    if found != FILE_FORMAT:
        if isinstance(found, str) and found.startswith("stc-concept-file/"):
            raise BadInput(f"{path} has format {found!r}, which this stc cannot read ({FILE_FORMAT}); "
                           "upgrade stc (pip install -U stc)")
        raise BadInput(f"{path} is not an stc concept file (format {found!r}, not {FILE_FORMAT!r})")
    missing = [key for key in REQUIRED if key not in metadata]
    if missing:
        raise BadInput(f"{path} lacks {', '.join(missing)} in its header")
    decoded = dict(metadata)
    for key in ("mapper", "layer_names", "text_encoders", "text_encoder_layers", "rank", "rank_max", "training",
                "metrics"):
        if key in metadata:
            try:
                decoded[key] = json.loads(metadata[key])
            except (ValueError, RecursionError) as exc:
                raise BadInput(f"{path}: its header's {key!r} is not valid JSON: {exc}") from exc
    kinds = {"mapper": dict, "layer_names": list, "text_encoders": list}
    for key, kind in kinds.items():
        if not isinstance(decoded[key], kind):
            raise BadInput(f"{path}: its header's {key!r} should be a {kind.__name__}")
    try:
        state = load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise BadInput(f"{path} is not a readable safetensors file: {exc}") from exc
    return decoded, state


def read(request):
    """``stc import`` of a single-file concept: the concept as it was exported."""
    from ..store.conceptio import mapper_from_state
    from .common import Imported, concept_from_record

    metadata, state = read_concept_file(request.path)
    try:
        mapper = mapper_from_state(metadata["mapper"], state, source=str(request.path))
    except StcError as exc:
        raise BadInput(str(exc)) from exc
    concept = concept_from_record(metadata, mapper, request, "stc-concept-file", f"{request.path}: its header")
    return Imported(concept, mapper, "stc-concept-file")
