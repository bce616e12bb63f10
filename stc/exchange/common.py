"""What every exchange format shares, and nothing that dispatches: the requests and results of
``stc import`` and ``stc export``, the concept an imported file becomes, its name and its base
model, and the distillation's presets. Format modules import from here, never from
``formats.py`` (the dispatcher) or each other, so ``stc/exchange`` has no import cycle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, StcError
from ..names import is_valid_name, suggest_name, validate_name
from ..settings import Settings
from ..store.concept import Concept, MetricsRecord, TrainingRecord

# (samples, fit steps) of the ti/a1111 distillation: the default fit and the thorough one
# (--thorough). The fit's cost is about samples x steps; on builtin:shapes the fast fit's denoiser
# error is within a few per cent of the thorough one's (QUALITY.md, python -m benchmarks.quality).
FAST = (64, 30)

THOROUGH = (256, 200)

@dataclass
class ExportJob:
    """One ``stc export``: the concept, its mapper and backbone, where the files go, and the
    choices the user made (the lossy formats' distillation settings among them)."""

    concept: Concept
    mapper: object  # NeTIMapper
    backbone: object  # the concept's family (stc.models.backbones)
    paths: list[Path]
    rank: int | None = None
    vectors: int = 1
    model: str | None = None
    model_config: str | None = None
    device: str | None = None
    progress: Callable[[int, int], None] | None = None
    on_status: Callable[[str], None] | None = None
    samples: int = FAST[0]
    fit_steps: int = FAST[1]
    env: Settings | None = None


@dataclass
class ExportResult:
    format: object  # registry.Format
    paths: list[Path]
    fidelity: object | None = None  # distill.Fidelity for the lossy formats
    exact: bool = False  # ti/a1111 of a textual-inversion concept: its own vectors, nothing distilled
    vectors: int = 0  # ti/a1111: how many vectors the file holds
    notes: list[str] = field(default_factory=list)  # ti/a1111: how other tools trigger the file
    warnings: list[str] = field(default_factory=list)  # ti/a1111: names other tools would misread


@dataclass
class ImportRequest:
    """What ``stc import`` was asked: the file or folder and the choices the user made."""

    path: Path
    name: str | None = None  # None: from the file
    init: str | None = None  # None: from the file, else "object"
    model: str | None = None  # None: from the file, the default model or the width (base_model_for)
    model_config: str | None = None
    env: Settings | None = None


@dataclass
class Imported:
    """What a format's reader made of a file: the concept, its mapper, and what to tell the user."""

    concept: Concept
    mapper: object  # NeTIMapper
    source_format: str  # "neti", "ti", "a1111", "diffusers-ti", "stc-diffusers"
    notes: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)  # kept beside the concept (a diffusers export's preview)


@dataclass
class ImportResult:
    concept: Concept  # as stored
    source_format: str
    notes: list[str]
    warnings: list[str] = field(default_factory=list)  # a name other tools would misread


def concept_from_record(record: dict, mapper, request: ImportRequest, source_format: str, where: str) -> Concept:
    """The concept an export's own record describes (a diffusers export's config.json, a concept
    file's header), as it was exported; ``--name`` and ``--model`` may change it."""
    for key in ("training", "metrics"):
        if not isinstance(record.get(key) or {}, dict):
            raise BadInput(f"{where}: {key!r} is not a mapping")
    training = TrainingRecord.from_dict(record.get("training") or {}, request.path)
    training.imported_from, training.source_format = str(request.path.resolve()), source_format
    return Concept(
        name=concept_name(request.name, record["name"]), base_model=request.model or record["base_model"],
        initializer=record["initializer"], text_width=mapper.config.text_width,
        layer_names=list(record["layer_names"]), mapper=dict(record["mapper"]), training=training,
        metrics=MetricsRecord.from_dict(record.get("metrics") or {}), created=str(record.get("created") or ""),
        base_fingerprint=str(record.get("base_fingerprint") or ""),
    )


def concept_name(name: str | None, fallback: str) -> str:
    """``name`` checked, else a valid spelling of what the file calls the concept."""
    if name is not None:
        return validate_name(name)
    candidate = fallback.strip("<>").lower()
    return candidate if is_valid_name(candidate) else suggest_name(candidate)


def new_concept(name: str, base_model: str, initializer: str, mapper, source: Path, source_format: str,
                steps: int | None = None) -> Concept:
    """A concept for a mapper imported from ``source``; its layers are those of the family its
    mapper's text encoders belong to (the formats name none)."""
    from ..models.backbones import backbone_for_widths

    record = TrainingRecord(steps_done=steps, imported_from=str(source.resolve()), source_format=source_format)
    return Concept(
        name=name, base_model=base_model, initializer=initializer, text_width=mapper.config.text_width,
        layer_names=list(backbone_for_widths(mapper.config.widths).layer_names), mapper=mapper.config.to_dict(),
        training=record, metrics=MetricsRecord(),
    )


def _model_width(spec: str, model_config: str | None) -> int | None:
    from ..models.base import text_width_of

    try:
        return text_width_of(spec, model_config)
    except StcError:
        return None


def base_model_for(request: ImportRequest, width: int, recorded: str | None) -> str:
    """The base model of a concept imported from ``request.path`` with text width ``width``:
    ``--model``; else the one the file records (a builtin, a local path or a hub id of that
    width); else the default model when it has that width; else the one builtin or model family
    of that width; else an error asking for ``--model``."""
    from ..models.backbones import BACKBONES
    from ..models.base import BUILTINS, canonical_spec

    model_config, source = request.model_config, request.path.name
    if request.model:
        return request.model
    if recorded:
        recorded_width = _model_width(recorded, model_config)
        if recorded_width == width:
            return canonical_spec(recorded)
        if recorded_width is None and recorded.count("/") == 1 and not Path(recorded).expanduser().exists():
            return recorded  # a hub id not on disk: its width is checked when the concept renders
    default = (request.env or Settings.from_environment()).default_model()
    if _model_width(default, model_config) == width:
        return default
    fitting = [spec for spec in BUILTINS if _model_width(spec, None) == width]
    fitting += [family.hub_model for family in BACKBONES if family.text_width == width]
    if len(fitting) == 1:
        return fitting[0]
    known = ", ".join([f"{spec} ({_model_width(spec, None)})" for spec in BUILTINS]
                      + [f"{family.label} ({family.text_width})" for family in BACKBONES])
    raise BadInput(
        f"{source} holds {width}-wide vectors and names no model stc can use; "
        + ("no model stc knows has that width" if not fitting else f"{', '.join(fitting)} all have it")
        + f" (known widths: {known}). Pass --model, the model it was trained for"
    )
