"""Bringing concepts in: reference NeTI checkpoints, textual-inversion embeddings, stc exports.

| source                                              | becomes                                      |
|-----------------------------------------------------|----------------------------------------------|
| `<name>-mapper.pt` (+ `-learned_embeds.bin`)        | the same mapper (every t, layer, rank, bypass)|
| `.safetensors` / `.pt` / `.bin` embedding (1 vector) | a constant concept without bypass            |
| an `stc export --format diffusers` folder            | the exported concept, unchanged              |

Pickled files are read by :mod:`stc.reference`'s restricted unpickler: no code in them runs.
A textual-inversion vector becomes a mapper whose output layer is zero and whose bias is the
vector, so it renders through the same path as any concept and mixes with them in prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .concept import Concept, MetricsRecord, TrainingRecord
from .errors import BadInput, ModelError
from .names import is_valid_name, suggest_name, validate_name

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_TEXT_WIDTH = 8192  # wider than any text encoder; a larger claimed width is refused before allocating


@dataclass
class ImportResult:
    concept: Concept
    source_format: str  # "neti", "ti", "a1111", "diffusers-ti", "stc-diffusers"
    notes: list[str]


def import_concept(registry, path: Path, name: str | None = None, init: str | None = None, model: str | None = None,
                   model_config: str | None = None) -> ImportResult:
    """Read ``path`` and store it as a concept in ``registry``."""
    from .conceptio import weights_bytes

    path = Path(path).expanduser()
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if path.is_dir():
        concept, mapper, source, notes = _from_stc_export(path, name, model)
    elif path.name.endswith("-mapper.pt"):
        concept, mapper, source, notes = _from_reference(path, name, init, model)
    elif path.suffix in EMBEDDING_SUFFIXES:
        concept, mapper, source, notes = _from_embedding(path, name, init, model)
    else:
        raise BadInput(
            f"{path.name}: stc imports reference NeTI checkpoints (*-mapper.pt), textual-inversion embeddings "
            "(.safetensors, .pt, .bin) and folders written by 'stc export --format diffusers'"
        )
    notes += _check_width(concept, model or concept.base_model, model_config)
    registry.save(concept, weights_bytes(mapper, concept.name))
    return ImportResult(concept=registry.load(concept.name), source_format=source, notes=notes)


# --------------------------------------------------------------------------- helpers


def _concept_name(name: str | None, fallback: str) -> str:
    if name is not None:
        return validate_name(name)
    candidate = fallback.strip("<>").lower()
    return candidate if is_valid_name(candidate) else suggest_name(candidate)


def _check_width(concept: Concept, spec: str, model_config: str | None) -> list[str]:
    """A clear error when the base model's text width is known and differs; a note when unknown."""
    from .models import text_width_of

    width = text_width_of(spec, model_config)
    if width is None:
        return [f"the text width of {spec} could not be read offline; it is checked when the concept renders"]
    if width != concept.text_width:
        raise ModelError(
            f"{concept.name} has text width {concept.text_width}, but {spec} has {width}; pass the --model it was "
            "made for"
        )
    return []


def _new_concept(name: str, base_model: str, initializer: str, mapper, extra: dict, steps: int | None = None) -> Concept:
    """A concept for an imported mapper; its layers are the 16 of SD 1.x/2.x (the formats name none)."""
    from .spacetime import SD_LAYER_NAMES

    return Concept(
        name=name, base_model=base_model, initializer=initializer, text_width=mapper.config.text_width,
        layer_names=list(SD_LAYER_NAMES), mapper=mapper.config.to_dict(),
        training=TrainingRecord(steps_done=steps, extra=extra), metrics=MetricsRecord(),
    )


# --------------------------------------------------------------------------- the sources


def _from_reference(path: Path, name, init, model):
    from .reference import mapper_from_reference, read_reference_mapper

    checkpoint = read_reference_mapper(path)
    mapper = mapper_from_reference(checkpoint)
    model_cfg = checkpoint.cfg.get("model") if isinstance(checkpoint.cfg.get("model"), dict) else {}
    base = model or model_cfg.get("pretrained_model_name_or_path")
    notes = []
    if not base:
        from .models import default_model

        base = default_model()
        notes.append(f"the checkpoint names no base model; recorded {base} (pass --model to choose)")
    steps = (checkpoint.cfg.get("optim") or {}).get("max_train_steps") if isinstance(checkpoint.cfg.get("optim"), dict) else None
    concept = _new_concept(
        _concept_name(name, checkpoint.placeholder_token or path.name.removesuffix("-mapper.pt")), str(base),
        init or checkpoint.super_category_token or "object", mapper,
        {"imported_from": str(path.resolve()), "source_format": "neti"},
        steps=int(steps) if isinstance(steps, int) else None,
    )
    return concept, mapper, "neti", notes


def read_embedding(path: Path):
    """The vectors [n, D] of a textual-inversion file, and its format name."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInput(f"{path} is not a readable safetensors file: {exc}") from exc
    else:
        from .reference import read_torch_checkpoint

        data = read_torch_checkpoint(path)
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        params = list(data["string_to_param"].values())
        if len(params) != 1 or not isinstance(params[0], torch.Tensor):
            raise BadInput(f"{path}: an A1111 embedding with {len(params)} tensors; expected one")
        vectors, source = params[0], "a1111"
    elif isinstance(data, dict) and isinstance(data.get("emb_params"), torch.Tensor):
        vectors, source = data["emb_params"], "ti"
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors, source = next(iter(data.values())), "diffusers-ti"
    else:
        keys = ", ".join(sorted(map(str, data))[:6]) if isinstance(data, dict) else type(data).__name__
        raise BadInput(f"{path} is not a textual-inversion embedding stc knows (found: {keys})")
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors
    return vectors, source


def constant_mapper(vector):
    """A mapper whose output is ``vector`` at every (t, l) and rank, without bypass."""
    import torch

    from .mapper import MapperConfig, NeTIMapper

    norm = float(vector.norm())
    if not norm > 0:
        raise BadInput("the embedding is all zeros")
    mapper = NeTIMapper(MapperConfig(text_width=vector.shape[0], norm_scale=norm, bypass=False,
                                     nested_dropout=False), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mapper.output_layer[0].weight.zero_()
        mapper.output_layer[0].bias.copy_(vector)
    return mapper.eval().requires_grad_(False)


def _from_embedding(path: Path, name, init, model):
    from .models import default_model

    vectors, source = read_embedding(path)
    if vectors.ndim != 2 or not 1 <= vectors.shape[-1] <= MAX_TEXT_WIDTH:
        raise BadInput(f"{path.name}: vectors of width {vectors.shape[-1] if vectors.ndim else '?'} fit no "
                       "text encoder stc knows")
    if vectors.shape[0] != 1:
        raise BadInput(
            f"{path.name} holds {vectors.shape[0] if vectors.ndim == 2 else '?'} vectors; an stc concept is one "
            "placeholder token, so stc imports single-vector embeddings (use this one in A1111, ComfyUI or "
            "diffusers directly)"
        )
    mapper = constant_mapper(vectors[0])
    stem = path.name.removesuffix(path.suffix)
    concept = _new_concept(_concept_name(name, stem), model or default_model(), init or "object", mapper,
                           {"imported_from": str(path.resolve()), "source_format": source})
    notes = ["a textual-inversion embedding: the same vector at every timestep and layer, no bypass; "
             "ranks change nothing"]
    return concept, mapper, source, notes


def _from_stc_export(folder: Path, name, model):
    from .conceptio import mapper_from_state
    from .export_diffusers import read_diffusers_export

    config, state_dict = read_diffusers_export(folder)
    mapper = mapper_from_state(config["mapper"], state_dict, source=str(folder))
    concept = Concept(
        name=_concept_name(name, config["name"]), base_model=model or config["base_model"],
        initializer=config["initializer"], text_width=int(config["text_width"]),
        layer_names=list(config["layer_names"]), mapper=dict(config["mapper"]),
        training=TrainingRecord(extra={"imported_from": str(folder.resolve()), "source_format": "stc-diffusers"}),
    )
    return concept, mapper, "stc-diffusers", []
