"""Plain textual-inversion embeddings: ``ti`` (one safetensors file, a tensor per text encoder:
``emb_params`` [n, D] for SD 1.x/2.x; ``clip_l`` [n, 768] and ``clip_g`` [n, 1280] for SDXL, the
layout kohya writes and the webui, ComfyUI and InvokeAI read; the family's backbone names the
keys), written by ``stc export`` and read by ``stc import`` together with the layouts other
tools write (diffusers' single-key files, kohya's, the webui's ``.pt`` in its current and original
``nn.ParameterDict`` forms; ``a1111.py`` writes the webui's).

An embedding is n fixed vectors, the same at every timestep and layer, with no bypass. Exporting
a NeTI concept distils them (:mod:`stc.exchange.distill`); importing one builds a *constant*
mapper whose output layer has a zero weight and the vectors as its bias, so it renders through
the same path as every concept and mixes with them in prompts; exporting that concept again
gives its vectors back, bit for bit (:func:`constant_vectors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import BadInput
from ..outputs import staged
from .common import ExportJob, ExportResult, Imported, ImportRequest, base_model_for, concept_name, new_concept
from .torchfiles import read_torch_file

MAX_TEXT_WIDTH = 8192  # wider than any text encoder; a larger claimed width is refused before allocating


# --------------------------------------------------------------------------- reading


@dataclass
class Embedding:
    """A textual-inversion file's vectors and what the file says about them."""

    vectors: object  # n x D, fp32
    source: str  # "ti", "a1111" or "diffusers-ti"
    token: str | None = None  # the token the file names (diffusers' single key)
    base_model: str | None = None  # the model the file says it was made for
    widths: list[int] | None = None  # each text encoder's part of a vector (SDXL: clip_l, clip_g); None: one encoder


def read_embedding(path: Path) -> Embedding:
    """The vectors [n, D] of a textual-inversion file, its layout, and what it records."""
    import torch

    from ..models.backbones import backbone_of_ti_keys

    metadata = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            data = load_file(path)
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInput(f"{path} is not a readable safetensors file: {exc}") from exc
    else:
        data = read_torch_file(path)
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        params = list(data["string_to_param"].values())
        if len(params) != 1 or not isinstance(params[0], torch.Tensor):
            raise BadInput(f"{path}: an A1111 embedding with {len(params)} tensors; expected one")
        checkpoint = data.get("sd_checkpoint_name")
        embedding = Embedding(params[0], "a1111", base_model=checkpoint if isinstance(checkpoint, str) else None)
    elif isinstance(data, dict) and backbone_of_ti_keys(data) is not None:
        embedding = _layout_embedding(path, data, metadata, backbone_of_ti_keys(data).ti_keys)
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        token, vectors = next(iter(data.items()))
        embedding = Embedding(vectors, "diffusers-ti", token=str(token))
    else:
        keys = ", ".join(sorted(map(str, data))[:6]) if isinstance(data, dict) else type(data).__name__
        raise BadInput(f"{path} is not a textual-inversion embedding stc knows (found: {keys})")
    vectors = embedding.vectors
    if vectors.ndim not in (1, 2) or not 1 <= vectors.shape[-1] <= MAX_TEXT_WIDTH:
        raise BadInput(f"{path.name}: vectors of shape {list(vectors.shape)} fit no text encoder stc knows")
    embedding.vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])
    if embedding.vectors.shape[0] == 0:
        raise BadInput(f"{path.name} holds no vectors")
    return embedding


def _layout_embedding(path: Path, data: dict, metadata: dict, keys: tuple[str, ...]) -> Embedding:
    """A family's embedding file: a tensor per text encoder under its key (``emb_params``; SDXL's
    ``clip_l`` [n, D_l] and ``clip_g`` [n, D_g]) -> n vectors [first | second …]."""
    import torch

    parts = [data[key] for key in keys]
    if not all(isinstance(part, torch.Tensor) for part in parts):
        raise BadInput(f"{path.name}: {' and '.join(keys)} must be tensors")
    parts = [part.detach().float().reshape(-1, part.shape[-1]) if part.ndim else part for part in parts]
    if any(part.ndim != 2 for part in parts) or len({part.shape[0] for part in parts}) != 1:
        shapes = " and ".join(f"{key} {list(data[key].shape)}" for key in keys)
        raise BadInput(f"{path.name}: {shapes} must hold as many vectors each")
    checkpoint = metadata.get("base_model")
    return Embedding(torch.cat(parts, dim=-1), "ti", base_model=checkpoint if isinstance(checkpoint, str) else None,
                     widths=[part.shape[-1] for part in parts])


def constant_mapper(vectors, widths: list[int] | None = None):
    """A mapper whose output is ``vectors`` (n x D: the n tokens of the placeholder) at every
    (t, l) and rank, without bypass. ``widths``: each text encoder's part of a vector (SDXL's two:
    the output groups hold the n vectors' parts of each encoder in turn, each at its own norm;
    None: one encoder)."""
    import torch

    from ..method.mapper import MapperConfig, NeTIMapper

    widths = list(widths or [vectors.shape[-1]])
    parts = list(vectors.split(widths, dim=-1))
    flat = torch.cat([part.reshape(-1) for part in parts])  # per encoder, its n vectors one after the other
    if not bool(torch.isfinite(flat).all()):
        raise BadInput("the embedding holds NaN or infinite values")
    norms = [float(part.norm()) for part in parts]
    if not min(norms) > 0:
        raise BadInput("the embedding is all zeros")
    config = MapperConfig.for_encoders(widths, norms, bypass=False, nested_dropout=False,
                                       num_vectors=vectors.shape[0])
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mapper.output_layer[0].weight.zero_()
        mapper.output_layer[0].bias.copy_(flat)
    return mapper.eval().requires_grad_(False)


def read(request: ImportRequest) -> Imported:
    """``stc import`` of a textual-inversion file (every layout :func:`read_embedding` knows)."""
    path = request.path
    embedding = read_embedding(path)
    mapper = constant_mapper(embedding.vectors, embedding.widths)
    count, width = embedding.vectors.shape
    base = base_model_for(request, width, embedding.base_model)
    name = concept_name(request.name, embedding.token or path.name.removesuffix(path.suffix))
    concept = new_concept(name, base, request.init or "object", mapper, path, embedding.source)
    vectors = "the same vector" if count == 1 else f"the same {count} vectors (<name> is {count} tokens)"
    note = f"a textual-inversion embedding: {vectors} at every timestep and layer, no bypass, no ranks"
    return Imported(concept, mapper, embedding.source, [note])


# --------------------------------------------------------------------------- writing


def constant_vectors(mapper):
    """The n x D vectors of a mapper whose output is the same at every (t, l) and rank (an imported
    textual-inversion embedding: its output layer's weight is zero, its bias the vectors), else None."""
    import torch

    layer = mapper.output_layer[0]
    config = mapper.config
    if config.bypass or bool(layer.weight.any()):
        return None
    bias = layer.bias.detach().float().cpu()
    parts = []
    for part, (width, norm) in zip(bias.split([width * config.num_vectors for width, _ in config.encoders]),
                                   config.encoders):
        scale = norm / float(part.norm())  # the output is bias / |bias| x norm_scale, per encoder
        if abs(scale - 1) > 1e-6:  # an import stores the vectors themselves (norm_scale = |bias|): exactly them
            part = part * scale
        parts.append(part.reshape(config.num_vectors, width))
    return torch.cat(parts, dim=-1)


def targets(name: str, out: Path, backbone) -> list[Path]:
    return [out / f"{name}.safetensors"]


def export(job: ExportJob, result: ExportResult) -> None:
    vectors, spec = embedding_vectors(job, result)
    write_ti(vectors, job.paths[0], spec, job.backbone)


def embedding_vectors(job: ExportJob, result: ExportResult):
    """The vectors an embedding export writes and the base model they are for: a textual-inversion
    concept's own (nothing to fit), else the concept distilled on its base model (or ``--model``)."""
    exact = constant_vectors(job.mapper)
    if exact is not None:
        result.exact, result.vectors = True, exact.shape[0]
        return exact, job.concept.base_model
    from ..models.base import canonical_spec, encoder_widths_of, load_base_model
    from ..render.generation import check_family
    from .distill import distil

    spec = job.model or job.concept.base_model
    widths = encoder_widths_of(spec, job.model_config)  # a model of another family: said before it loads
    if widths is not None:
        check_family(job.concept, canonical_spec(spec), widths)
    if job.on_status:
        job.on_status(f"loading {spec}")
    base = load_base_model(spec, device=job.device, config=job.model_config, env=job.env)
    distilled = distil(base, job.concept, job.mapper, vectors=job.vectors, rank=job.rank, samples=job.samples,
                       steps=job.fit_steps, progress=job.progress)
    result.fidelity, result.vectors = distilled.fidelity, distilled.vectors.shape[0]
    return distilled.vectors, base.spec


def write_ti(vectors, path: Path, base_model: str, backbone) -> None:
    """The family's textual-inversion safetensors (``backbone.ti_tensors``: ``emb_params`` [n, D],
    the single-key layout diffusers, A1111, ComfyUI and kohya load; SDXL's ``clip_l`` [n, D_l] and
    ``clip_g`` [n, D_g] and no other tensor). The header's metadata (strings only) names the base
    model, so ``stc import`` gives the concept back its model."""
    from safetensors.torch import save

    metadata = {"format": "stc-ti", "stc_version": __version__, "base_model": base_model}
    tensors = backbone.ti_tensors(vectors.detach().float().cpu())
    with staged(path) as temporary:
        temporary.write_bytes(save(tensors, metadata=metadata))


# --------------------------------------------------------------------------- how other tools trigger a file


def kohya_tokens(stem: str, count: int) -> list[str]:
    """The tokens kohya's scripts add for an embedding file ``<stem>.*`` of ``count`` vectors: the
    file name, then the file name numbered from 1 (``w1`` of 2 vectors: ``w1``, ``w11``)."""
    return [stem] + [f"{stem}{index}" for index in range(1, count)]


def numbered_clashes(name: str, others) -> list[str]:
    """Names among ``others`` that kohya's numbering can make the same token as ``name``: one of the
    two is the other followed by digits (``w`` and ``w1``, ``w1`` and ``w11``); whether they do
    depends on how many vectors each file holds, so any such pair is reported."""
    def numbered(longer: str, shorter: str) -> bool:
        return longer.startswith(shorter) and longer[len(shorter):].isdigit()

    return sorted(other for other in others if other != name and (numbered(other, name) or numbered(name, other)))


def trigger_note(name: str, count: int) -> str:
    """How a ti/a1111 export ``<name>.*`` of ``count`` vectors is triggered in each tool."""
    kohya = " ".join(kohya_tokens(name, count))
    diffusers = " ".join([f"<{name}>"] + [f"<{name}>_{index}" for index in range(1, count)])
    return (f"other tools trigger this file by its name: A1111 webui '{name}', ComfyUI 'embedding:{name}', "
            f"kohya '{kohya}'; diffusers: load_textual_inversion(..., token='<{name}>') gives '{diffusers}'")


def export_warnings(name: str, count: int, other_names, tokenizers, model: str) -> list[str]:
    """What may go wrong when a ti/a1111 export of concept ``name`` (``count`` vectors) is used
    beside other embeddings: a name of the base model's vocabulary, and kohya tokens that other
    concepts' exports would claim too."""
    from ..models.vocabulary import is_vocabulary_word, name_warning

    found = [message for message in [name_warning(name, tokenizers, model)] if message]
    clashes = numbered_clashes(name, other_names)
    if clashes:
        shown = ", ".join(f"'{other}'" for other in clashes[:5])
        found.append(
            f"kohya's scripts number an embedding's extra vectors after its file name ('{name}' of {count}: "
            f"{', '.join(kohya_tokens(name, count))}); with {shown} in the registry, exports of "
            f"{'these' if len(clashes) > 1 else 'it'} and of '{name}' can claim the same token there, and kohya "
            "stops at the second file. Keep them apart, or rename one (stc mv) so neither name is the other "
            "followed by digits"
        )
    numbered_words = [token for token in kohya_tokens(name, count)[1:] if is_vocabulary_word(token, tokenizers)]
    if numbered_words:
        found.append(f"kohya's token{'s' if len(numbered_words) > 1 else ''} {', '.join(numbered_words)} for the "
                     f"extra vectors of '{name}' {'are words' if len(numbered_words) > 1 else 'is a word'} of "
                     f"{model}'s vocabulary: kohya's scripts refuse the file")
    return found
