"""``stc export`` and ``stc import``: which formats there are, what each keeps and loses, and the
one entry point of each command. The formats themselves live one per module, reading beside
writing:

| format      | files                                        | module           | read by                              |
|-------------|----------------------------------------------|------------------|--------------------------------------|
| `diffusers` | `<name>/` (module, weights, config, card)| `diffusers_folder`| plain diffusers, with the bundled module|
| `ti`        | `<name>.safetensors` (`emb_params` [n, D])   | `ti`             | diffusers, A1111, ComfyUI, kohya     |
| `a1111`     | `<name>.pt` (`string_to_param` {'*': [n, D]})| `ti`             | the A1111 webui (its safe loader too)|

SDXL concepts: `ti` and `a1111` both write `<name>.safetensors` with `clip_l` [n, 768] and `clip_g`
[n, 1280] (the layout every SDXL tool reads); `neti` is SD 1.x only.
| `neti`      | `<name>-mapper.pt`, `<name>-learned_embeds.bin`| `neti`        | the reference implementation's scripts|

Exporting only reads the registry. Files are written beside their target and moved into
place, so a failed export leaves nothing half-written; an existing target is refused unless
``force``. Importing stores the concept through the registry's one atomic save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, ModelError, StcError
from ..names import is_valid_name, suggest_name, validate_name
from ..outputs import check_folder, refuse_existing, staged
from ..settings import Settings
from ..store.concept import CONCEPT_FILE, Concept, MetricsRecord, TrainingRecord

# (samples, fit steps) of the ti/a1111 distillation: the default fit and the thorough one
# (--thorough). The fit's cost is about samples x steps; on builtin:shapes the fast fit's denoiser
# error is within a few per cent of the thorough one's (QUALITY.md, python -m benchmarks.quality).
FAST = (64, 30)

THOROUGH = (256, 200)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class ExportFormat:
    name: str
    keeps: str
    loses: str


FORMATS = {
    "diffusers": ExportFormat(
        "diffusers",
        keeps="everything: the mapper for every timestep, layer and rank, and the textual bypass",
        loses="nothing; it renders through the bundled stc_concept.py (torch, diffusers, transformers)",
    ),
    "ti": ExportFormat(
        "ti",
        keeps="n fixed vectors distilled from the concept at the chosen rank",
        loses="time and space (one embedding for every step and layer), the textual bypass and ranks",
    ),
    "a1111": ExportFormat(
        "a1111",
        keeps="the same distilled vectors as ti, in the webui's native .pt layout",
        loses="time and space (one embedding for every step and layer), the textual bypass and ranks",
    ),
    "neti": ExportFormat(
        "neti",
        keeps="the mapper exactly: every timestep, layer, rank and the bypass",
        loses="stc's metadata (training record, previews, sha256); SD 1.x text width (768) only",
    ),
}


def check_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise BadInput(f"unknown export format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


# --------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    format: ExportFormat
    paths: list[Path]
    fidelity: object | None = None  # distill.Fidelity for the lossy formats
    exact: bool = False  # ti/a1111 of a textual-inversion concept: its own vectors, nothing distilled


def target_paths(format_name: str, name: str, out: Path, sdxl: bool = False) -> list[Path]:
    """Where an export of concept ``name`` goes inside the folder ``out`` (an SDXL concept's a1111
    export is the same clip_l/clip_g safetensors file as its ti one: what the webui reads for SDXL)."""
    return {
        "diffusers": [out / name],
        "ti": [out / f"{name}.safetensors"],
        "a1111": [out / f"{name}.safetensors" if sdxl else out / f"{name}.pt"],
        "neti": [out / f"{name}-mapper.pt", out / f"{name}-learned_embeds.bin"],
    }[format_name]


def check_targets(paths: list[Path], force: bool) -> None:
    """Refuse existing targets (unless ``force``) and folders that cannot be written, before any
    work. ``--force`` replaces only what an export writes: a diffusers export's folder that holds
    other files is refused, naming them."""
    refuse_existing(paths, force)
    check_folder(paths[0].parent)
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            from .diffusers_folder import EXPORT_FILES

            others = sorted(item.name for item in path.iterdir() if item.name not in EXPORT_FILES)
            if others:
                shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                raise BadInput(f"{path} holds files an export does not write ({shown}); --force replaces only an "
                               "export's own files: move them, or choose another --out")
        elif path.exists() and not path.is_file():
            raise BadInput(f"{path} exists and is not a file; choose another --out")


def _writing(paths: list[Path]):
    """Turn OS errors while writing ``paths`` into one-line errors."""

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except OSError as exc:
            raise BadInput(f"cannot write {paths[0]}: {exc.strerror or exc}") from exc

    return guard()


def export_concept(
    registry, name: str, format_name: str, out: Path | None = None, rank: int | None = None, vectors: int = 1,
    force: bool = False, model: str | None = None, model_config: str | None = None, device: str | None = None,
    progress: Callable[[int, int], None] | None = None, on_status: Callable[[str], None] | None = None,
    samples: int | None = None, fit_steps: int | None = None, thorough: bool = False, env: Settings | None = None,
) -> ExportResult:
    """Export concept ``name`` as ``format_name`` into the folder ``out`` (default: the current one).

    ti/a1111 distil the concept: ``samples`` and ``fit_steps`` default to the fast fit (seconds),
    or with ``thorough`` to the thorough one (minutes).
    """
    preset = THOROUGH if thorough else FAST
    samples = preset[0] if samples is None else samples
    fit_steps = preset[1] if fit_steps is None else fit_steps
    from ..render.prompts import check_rank
    from ..store.conceptio import load_mapper

    export_format = check_format(format_name)
    concept = registry.load(name)
    if rank is not None:
        check_rank(concept.name, rank, concept.rank_max, f"--rank {rank}")
    for flag, value in (("--vectors", vectors), ("--samples", samples), ("--fit-steps", fit_steps)):
        if value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}")
    if format_name == "neti" and len(concept.encoder_widths) > 1:
        raise BadInput(f"{name} is an SDXL concept; the neti format is the reference implementation's, which is "
                       "SD 1.x only. Export it as diffusers (lossless) or ti/a1111")
    paths = target_paths(format_name, name, Path(out or ".").expanduser(), sdxl=len(concept.encoder_widths) > 1)
    check_targets(paths, force)
    mapper = load_mapper(concept)
    result = ExportResult(format=export_format, paths=paths)
    with _writing(paths):
        if format_name == "diffusers":
            from ..store.registry import preview_paths
            from .diffusers_folder import write_diffusers_export

            previews = [p for p in preview_paths(concept.path) if p.name == "preview.png"]
            with staged(paths[0], is_dir=True) as folder:
                write_diffusers_export(concept, concept.weights_path.read_bytes(), folder, rank=rank,
                                       preview=previews[0] if previews else None)
        elif format_name == "neti":
            from .neti import write_neti

            write_neti(concept, mapper, paths)  # the mapper alone: no base model needed
        else:
            from .ti import constant_vectors, write_a1111, write_ti

            exact = constant_vectors(mapper)
            if exact is not None:  # a textual-inversion concept: its vectors as they are, nothing to fit
                result.exact = True
                fitted, spec = exact, concept.base_model
            else:
                fitted, spec, result.fidelity = _distil(concept, mapper, rank, vectors, model, model_config,
                                                        device, progress, on_status, samples, fit_steps, env)
            if format_name == "ti" or len(concept.encoder_widths) > 1:  # SDXL: one clip_l/clip_g file for both
                write_ti(fitted, paths[0], spec, concept.encoder_widths)
            else:
                write_a1111(fitted, paths[0], concept.name, concept.steps_done or 0, spec)
    return result


def _distil(concept, mapper, rank, vectors, model, model_config, device, progress, on_status, samples, fit_steps, env):
    from ..models.base import load_base_model
    from .distill import distil

    spec = model or concept.base_model
    if on_status:
        on_status(f"loading {spec}")
    base = load_base_model(spec, device=device, config=model_config, env=env)
    distilled = distil(base, concept, mapper, vectors=vectors, rank=rank, samples=samples, steps=fit_steps,
                       progress=progress)
    return distilled.vectors, base.spec, distilled.fidelity


# --------------------------------------------------------------------------- import


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


def import_concept(registry, path: Path, name: str | None = None, init: str | None = None, model: str | None = None,
                   model_config: str | None = None, env: Settings | None = None) -> ImportResult:
    """Read ``path`` and store it as a concept in ``registry``."""
    from ..store.conceptio import weights_bytes

    path = Path(path).expanduser()
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if init is not None and not init.strip():
        raise BadInput("--init must be a word (e.g. --init dog), not empty; leave it out to take the file's")
    if path.is_dir() and not (path / CONCEPT_FILE).is_file():
        path = _the_concept_of_a_registry(path)
    request = ImportRequest(path, name, init, model, model_config, env or Settings.from_environment())
    if path.is_dir() and (path / CONCEPT_FILE).is_file():
        reader = import_concept_folder
    elif path.is_dir():
        from .diffusers_folder import import_diffusers_export as reader
    elif path.name.endswith("-mapper.pt"):
        from .neti import import_reference as reader
    elif path.suffix in EMBEDDING_SUFFIXES:
        from .ti import import_embedding as reader
    else:
        raise BadInput(
            f"{path.name}: stc imports reference NeTI checkpoints (*-mapper.pt), textual-inversion embeddings "
            "(.safetensors, .pt, .bin), folders written by 'stc export --format diffusers' and concept folders of "
            "another registry"
        )
    imported = reader(request)
    concept = imported.concept
    notes = imported.notes + _check_width(concept, model or concept.base_model, model_config)
    registry.save(concept, weights_bytes(imported.mapper, concept.name), extra_files=imported.files)
    return ImportResult(concept=registry.load(concept.name), source_format=imported.source_format, notes=notes)


def _the_concept_of_a_registry(path: Path) -> Path:
    """For the top folder of another registry (a run rescued from a full disk, ``<name>-rescued-
    stepN``): the folder of its one concept; ``path`` itself when it is no registry."""
    from ..store.registry import Registry

    concepts = Registry(path).concepts_dir
    if not concepts.is_dir():
        return path
    found = sorted(folder for folder in concepts.iterdir() if (folder / CONCEPT_FILE).is_file())
    if len(found) > 1:
        shown = ", ".join(str(folder) for folder in found[:5]) + (", …" if len(found) > 5 else "")
        raise BadInput(f"{path} is a registry of {len(found)} concepts; import one of its concept folders: {shown}")
    return found[0] if found else path


def import_concept_folder(request: ImportRequest) -> Imported:
    """A concept folder of another registry (a copy, a backup, a run rescued from a full disk): the
    concept as it is, with every file it has (metrics, previews, a training checkpoint: an
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


def concept_name(name: str | None, fallback: str) -> str:
    """``name`` checked, else a valid spelling of what the file calls the concept."""
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


def new_concept(name: str, base_model: str, initializer: str, mapper, source: Path, source_format: str,
                steps: int | None = None) -> Concept:
    """A concept for a mapper imported from ``source``; its layers are the 16 of SD 1.x/2.x, or
    SDXL's 11 for a mapper of two text encoders (the formats name none)."""
    from ..method.spacetime import layer_names_for

    record = TrainingRecord(steps_done=steps, imported_from=str(source.resolve()), source_format=source_format)
    return Concept(
        name=name, base_model=base_model, initializer=initializer, text_width=mapper.config.text_width,
        layer_names=list(layer_names_for(len(mapper.config.encoders))), mapper=mapper.config.to_dict(), training=record,
        metrics=MetricsRecord(),
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
    from ..models.base import BUILTINS, canonical_spec
    from ..models.families import FAMILIES

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
    fitting += [family.hub_model for family in FAMILIES if family.text_width == width]
    if len(fitting) == 1:
        return fitting[0]
    known = ", ".join([f"{spec} ({_model_width(spec, None)})" for spec in BUILTINS]
                      + [f"{family.label} ({family.text_width})" for family in FAMILIES])
    raise BadInput(
        f"{source} holds {width}-wide vectors and names no model stc can use; "
        + ("no model stc knows has that width" if not fitting else f"{', '.join(fitting)} all have it")
        + f" (known widths: {known}). Pass --model, the model it was trained for"
    )
