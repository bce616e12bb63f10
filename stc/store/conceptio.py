"""A concept's weights as a mapper, and back: the only code that does either.

The registry (``registry.py``) stores bytes and metadata and never imports torch; this module
turns ``mapper.safetensors`` into a :class:`~stc.method.mapper.NeTIMapper` (weights checked against
``concept.yaml`` first) and a mapper into the bytes of that file. Imported reference
checkpoints are built through :func:`mapper_from_state` too, so every mapper stc runs was
loaded the same way. The file layout is specified in ``docs/concept-format.md``.
"""

from __future__ import annotations

from ..errors import CorruptConcept, DamagedWeights, one_line
from .registry import CONCEPT_FILE, Concept, check_weights

WEIGHTS_FORMAT = "stc-concept"  # the safetensors header's ``format`` metadata


def mapper_from_state(config, state_dict: dict, source: str = "the weights"):
    """A mapper built from ``config`` (a MapperConfig or its dict) with ``state_dict`` loaded
    strictly; fp32, CPU, eval mode, no gradients."""
    import torch

    from ..method.mapper import MapperConfig, NeTIMapper

    try:
        config = config if isinstance(config, MapperConfig) else MapperConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CorruptConcept(f"{source}: bad mapper config: {exc}") from exc
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(0))
    try:
        mapper.load_state_dict({key: value.float() for key, value in state_dict.items()}, strict=True)
    except RuntimeError as exc:
        raise CorruptConcept(f"{source} does not fit its mapper config: {one_line(exc)}") from exc
    return mapper.eval().requires_grad_(False)


def weights_bytes(mapper, name: str) -> bytes:
    """The contents of ``mapper.safetensors`` for ``mapper`` (fp32, CPU, no pickles)."""
    from safetensors.torch import save

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in mapper.state_dict().items()}
    return save(tensors, metadata={"format": WEIGHTS_FORMAT, "name": name})


def read_state_dict(concept: Concept, verify: bool = True) -> dict:
    """The tensors of ``concept``'s weights file, after checking it is complete (and, with
    ``verify``, that it is the file ``concept.yaml`` records)."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    check = check_weights(concept, hash_file=False)  # complete? (header and size, cheap)
    if not check.ok:
        raise DamagedWeights(f"{check.problem}; the concept {concept.name!r} cannot be used")
    try:
        content = concept.weights_path.read_bytes()  # read once: what is hashed is what is loaded
        if verify and concept.weights_sha256 and hashlib.sha256(content).hexdigest() != concept.weights_sha256:
            check = check_weights(concept)  # says why: changed by another process, or damaged
            raise DamagedWeights(f"{check.problem or 'the weights changed while being read'}; the concept "
                                 f"{concept.name!r} cannot be used")
        return load(content)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedWeights(f"{concept.weights_path} is not a readable safetensors file: {exc}") from exc


def load_mapper(concept: Concept):
    """``concept``'s mapper in eval mode (fp32, CPU), its weights verified."""
    return mapper_from_state(
        concept.mapper, read_state_dict(concept), source=f"{concept.path / CONCEPT_FILE} and its weights"
    )
