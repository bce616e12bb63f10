"""Plain textual-inversion embeddings: ``ti`` (one safetensors tensor ``emb_params`` [n, D]) and
``a1111`` (the webui's ``.pt``), written by ``stc export`` and read by ``stc import`` together
with the layouts other tools write (diffusers' single-key files, kohya's, the webui's original
``nn.ParameterDict`` one).

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
from .torchfiles import portable_torch_save, read_torch_file

A1111_STAR_TOKEN = 265  # CLIP's id of '*', the key every A1111 embedding uses

MAX_TEXT_WIDTH = 8192  # wider than any text encoder; a larger claimed width is refused before allocating


# --------------------------------------------------------------------------- reading


@dataclass
class Embedding:
    """A textual-inversion file's vectors and what the file says about them."""

    vectors: object  # n x D, fp32
    source: str  # "ti", "a1111" or "diffusers-ti"
    token: str | None = None  # the token the file names (diffusers' single key)
    base_model: str | None = None  # the model the file says it was made for


def read_embedding(path: Path) -> Embedding:
    """The vectors [n, D] of a textual-inversion file, its layout, and what it records."""
    import torch

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
    elif isinstance(data, dict) and isinstance(data.get("emb_params"), torch.Tensor):
        embedding = Embedding(data["emb_params"], "ti", base_model=metadata.get("base_model"))
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


def constant_mapper(vectors):
    """A mapper whose output is ``vectors`` (n x D: the n tokens of the placeholder) at every
    (t, l) and rank, without bypass."""
    import torch

    from ..method.mapper import MapperConfig, NeTIMapper

    flat = vectors.reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raise BadInput("the embedding holds NaN or infinite values")
    norm = float(flat.norm())
    if not norm > 0:
        raise BadInput("the embedding is all zeros")
    mapper = NeTIMapper(MapperConfig(text_width=vectors.shape[-1], norm_scale=norm, bypass=False,
                                     nested_dropout=False, num_vectors=vectors.shape[0]),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mapper.output_layer[0].weight.zero_()
        mapper.output_layer[0].bias.copy_(flat)
    return mapper.eval().requires_grad_(False)


def import_embedding(request):
    """``stc import`` of a textual-inversion file (a :class:`~stc.exchange.formats.ImportRequest`)."""
    from .formats import Imported, base_model_for, concept_name, new_concept

    path = request.path
    embedding = read_embedding(path)
    mapper = constant_mapper(embedding.vectors)
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
    layer = mapper.output_layer[0]
    if mapper.config.bypass or bool(layer.weight.any()):
        return None
    bias = layer.bias.detach().float().cpu()
    scale = mapper.config.norm_scale / float(bias.norm())  # the output is bias / |bias| x norm_scale
    if abs(scale - 1) > 1e-6:  # an import stores the vectors themselves (norm_scale = |bias|): exactly them
        bias = bias * scale
    return bias.reshape(mapper.config.num_vectors, mapper.config.text_width)


def write_ti(vectors, path: Path, base_model: str = "") -> None:
    """``emb_params`` [n, D]: the single-key layout diffusers, A1111, ComfyUI and kohya load. The
    header's metadata names the base model, so ``stc import`` gives the concept back its model."""
    from safetensors.torch import save

    metadata = {"format": "stc-ti", "stc_version": __version__, "base_model": base_model}
    with staged(path) as temporary:
        temporary.write_bytes(save({"emb_params": vectors.detach().float().cpu().contiguous()}, metadata=metadata))


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
