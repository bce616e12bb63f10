"""Bringing concepts in: reference NeTI checkpoints, textual-inversion embeddings, stc exports.

| source                                              | becomes                                      |
|-----------------------------------------------------|----------------------------------------------|
| `<name>-mapper.pt` (+ `-learned_embeds.bin`)        | the same mapper (every t, layer, rank, bypass)|
| `.safetensors` / `.pt` / `.bin` embedding (1 vector) | a constant concept without bypass            |
| an `stc export --format diffusers` folder            | the exported concept, unchanged              |

Pickled files are read by :mod:`stc.exchange.reference`'s restricted unpickler: no code in them runs.
A textual-inversion vector becomes a mapper whose output layer is zero and whose bias is the
vector, so it renders through the same path as any concept and mixes with them in prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..store.concept import Concept, MetricsRecord, TrainingRecord
from ..errors import BadInput, ModelError, StcError
from ..names import is_valid_name, suggest_name, validate_name

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
    from ..store.conceptio import weights_bytes

    path = Path(path).expanduser()
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    files = {}
    if path.is_dir():
        concept, mapper, source, notes, files = _from_stc_export(path, name, model)
    elif path.name.endswith("-mapper.pt"):
        concept, mapper, source, notes = _from_reference(path, name, init, model, model_config)
    elif path.suffix in EMBEDDING_SUFFIXES:
        concept, mapper, source, notes = _from_embedding(path, name, init, model, model_config)
    else:
        raise BadInput(
            f"{path.name}: stc imports reference NeTI checkpoints (*-mapper.pt), textual-inversion embeddings "
            "(.safetensors, .pt, .bin) and folders written by 'stc export --format diffusers'"
        )
    notes += _check_width(concept, model or concept.base_model, model_config)
    registry.save(concept, weights_bytes(mapper, concept.name), extra_files=files)
    return ImportResult(concept=registry.load(concept.name), source_format=source, notes=notes)


# --------------------------------------------------------------------------- helpers


def _concept_name(name: str | None, fallback: str) -> str:
    if name is not None:
        return validate_name(name)
    candidate = fallback.strip("<>").lower()
    return candidate if is_valid_name(candidate) else suggest_name(candidate)


def _check_width(concept: Concept, spec: str, model_config: str | None) -> list[str]:
    """A clear error when the base model's text width is known and differs; a note when unknown."""
    from ..models.base import text_width_of

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
    from ..method.spacetime import SD_LAYER_NAMES

    return Concept(
        name=name, base_model=base_model, initializer=initializer, text_width=mapper.config.text_width,
        layer_names=list(SD_LAYER_NAMES), mapper=mapper.config.to_dict(),
        training=TrainingRecord(steps_done=steps, extra=extra), metrics=MetricsRecord(),
    )


# --------------------------------------------------------------------------- the sources


def _from_reference(path: Path, name, init, model, model_config):
    from .reference import mapper_from_reference, read_reference_mapper

    checkpoint = read_reference_mapper(path)
    mapper = mapper_from_reference(checkpoint)
    model_cfg = checkpoint.cfg.get("model") if isinstance(checkpoint.cfg.get("model"), dict) else {}
    recorded = model_cfg.get("pretrained_model_name_or_path")
    base, notes = base_model_for(mapper.config.text_width, model, recorded if isinstance(recorded, str) else None,
                                 model_config, path.name)
    steps = (checkpoint.cfg.get("optim") or {}).get("max_train_steps") if isinstance(checkpoint.cfg.get("optim"), dict) else None
    concept = _new_concept(
        _concept_name(name, checkpoint.placeholder_token or path.name.removesuffix("-mapper.pt")), base,
        init or checkpoint.super_category_token or "object", mapper,
        {"imported_from": str(path.resolve()), "source_format": "neti"},
        steps=int(steps) if isinstance(steps, int) else None,
    )
    return concept, mapper, "neti", notes


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
        from .reference import read_torch_checkpoint

        data = read_torch_checkpoint(path)
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


def _from_embedding(path: Path, name, init, model, model_config):
    embedding = read_embedding(path)
    mapper = constant_mapper(embedding.vectors)
    stem = path.name.removesuffix(path.suffix)
    count, width = embedding.vectors.shape
    base, notes = base_model_for(width, model, embedding.base_model, model_config, path.name)
    concept = _new_concept(_concept_name(name, embedding.token or stem), base, init or "object", mapper,
                           {"imported_from": str(path.resolve()), "source_format": embedding.source})
    vectors = "the same vector" if count == 1 else f"the same {count} vectors (<name> is {count} tokens)"
    notes.append(f"a textual-inversion embedding: {vectors} at every timestep and layer, no bypass, no ranks")
    return concept, mapper, embedding.source, notes


def _model_width(spec: str, model_config: str | None) -> int | None:
    from ..models.base import text_width_of

    try:
        return text_width_of(spec, model_config)
    except StcError:
        return None


def base_model_for(width: int, model: str | None, recorded: str | None, model_config: str | None,
                   source: str) -> tuple[str, list[str]]:
    """The base model of an imported embedding of text width ``width``: ``--model``; else the one the
    file records (a builtin, a local path or a hub id of that width); else the default model when
    it has that width; else the one builtin or model family of that width. Returns it and notes."""
    from ..models.base import BUILTINS, FAMILY_MODELS, canonical_spec, default_model

    if model:
        return model, []
    if recorded:
        recorded_width = _model_width(recorded, model_config)
        if recorded_width == width:
            return canonical_spec(recorded), []
        if recorded_width is None and recorded.count("/") == 1 and not Path(recorded).expanduser().exists():
            return recorded, []  # a hub id not on disk: its width is checked when the concept renders
    default = default_model()
    if _model_width(default, model_config) == width:
        return default, []
    fitting = [spec for spec in BUILTINS if _model_width(spec, None) == width]
    fitting += [spec for spec, family_width in FAMILY_MODELS.items() if family_width == width]
    if len(fitting) == 1:
        return fitting[0], []
    known = ", ".join(f"{spec} ({_model_width(spec, None) or FAMILY_MODELS[spec]})" for spec in
                      [*BUILTINS, *FAMILY_MODELS])
    raise BadInput(
        f"{source} holds {width}-wide vectors and names no model stc can use; "
        + ("no model stc knows has that width" if not fitting else f"{', '.join(fitting)} all have it")
        + f" (known widths: {known}). Pass --model, the model it was trained for"
    )


def _from_stc_export(folder: Path, name, model):
    from ..store.conceptio import mapper_from_state
    from .export_diffusers import PREVIEW_FILE, read_diffusers_export

    config, state_dict = read_diffusers_export(folder)
    mapper = mapper_from_state(config["mapper"], state_dict, source=str(folder))
    for key in ("training", "metrics"):
        if not isinstance(config.get(key) or {}, dict):
            raise BadInput(f"{folder}: '{key}' in its config.json is not a mapping")
    training = TrainingRecord.from_dict(config.get("training") or {}, folder)
    training.extra = {**training.extra, "imported_from": str(folder.resolve()), "source_format": "stc-diffusers"}
    concept = Concept(
        name=_concept_name(name, config["name"]), base_model=model or config["base_model"],
        initializer=config["initializer"], text_width=int(config["text_width"]),
        layer_names=list(config["layer_names"]), mapper=dict(config["mapper"]), training=training,
        metrics=MetricsRecord.from_dict(config.get("metrics") or {}), created=str(config.get("created") or ""),
        base_fingerprint=str(config.get("base_fingerprint") or ""),
    )
    preview = folder / PREVIEW_FILE
    files = {PREVIEW_FILE: preview} if preview.is_file() and not preview.is_symlink() else {}
    return concept, mapper, "stc-diffusers", [], files
