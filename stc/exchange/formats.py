"""``stc export`` and ``stc import``: the one entry point of each command. Which formats there
are, and what each keeps and loses, is the registry's (``registry.py``); each format's code is
one module, reading beside writing:

| format      | files                                           | module             | read by                     |
|-------------|-------------------------------------------------|--------------------|-----------------------------|
| `diffusers` | `<name>/` (module, weights, config, card)       | `diffusers_folder` | plain diffusers             |
| `ti`        | `<name>.safetensors` (`emb_params` [n, D])      | `ti`               | diffusers, A1111, ComfyUI  |
| `a1111`     | `<name>.pt` (`string_to_param` {'*': [n, D]})   | `a1111`            | the A1111 webui             |
| `neti`      | `<name>-mapper.pt`, `<name>-learned_embeds.bin` | `neti`             | the reference's scripts     |

SDXL concepts: `ti` and `a1111` both write `<name>.safetensors` with `clip_l` [n, 768] and
`clip_g` [n, 1280] (the one layout every SDXL tool reads; the webui's `.pt` holds one tensor);
`neti` is SD 1.x only. ``stc import`` also reads a concept folder of another registry
(``concept_folder``).

Exporting only reads the registry. Files are written beside their target and moved into
place, so a failed export leaves nothing half-written; an existing target is refused unless
``force``. Importing stores the concept through the registry's one atomic save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from ..errors import BadInput, ModelError
from ..outputs import check_folder, refuse_existing, staged
from ..settings import Settings
from .common import FAST, THOROUGH, ExportJob, ExportResult, ImportRequest, ImportResult
from .registry import FORMATS, check_format, export_formats, reader_of

__all__ = ["FAST", "FORMATS", "THOROUGH", "check_format", "export_concept", "export_formats", "import_concept",
           "target_paths"]


# --------------------------------------------------------------------------- export


def target_paths(format_name: str, name: str, out: Path, backbone) -> list[Path]:
    """Where an export of concept ``name`` (of the family ``backbone``) goes inside the folder ``out``."""
    return check_format(format_name).code().targets(name, out, backbone)


def check_targets(paths: list[Path], force: bool, owned: tuple[str, ...] = ()) -> None:
    """Refuse existing targets (unless ``force``) and folders that cannot be written, before any
    work. ``--force`` replaces only what an export writes (``owned``: a folder export's files): a
    folder that holds other files is refused, naming them."""
    refuse_existing(paths, force)
    check_folder(paths[0].parent)
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            others = sorted(item.name for item in path.iterdir() if item.name not in owned)
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

    The distilling formats (ti/a1111): ``samples`` and ``fit_steps`` default to the fast fit
    (seconds), or with ``thorough`` to the thorough one (minutes).
    """
    from ..method.mapper_config import check_rank
    from ..models.backbones import backbone_for_widths
    from ..store.conceptio import load_mapper

    preset = THOROUGH if thorough else FAST
    samples = preset[0] if samples is None else samples
    fit_steps = preset[1] if fit_steps is None else fit_steps
    export_format = check_format(format_name)
    concept = registry.load(name)
    if rank is not None:
        check_rank(concept.name, rank, concept.rank_max, f"--rank {rank}")
    for flag, value in (("--vectors", vectors), ("--samples", samples), ("--fit-steps", fit_steps)):
        if value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}")
    backbone = backbone_for_widths(concept.encoder_widths)
    if not export_format.holds(backbone):
        raise BadInput(f"{name} is a concept for {backbone.label} (text width {backbone.text_width}); "
                       f"{export_format.refusal}")
    code = export_format.code()
    paths = code.targets(name, Path(out or ".").expanduser(), backbone)
    check_targets(paths, force, getattr(code, "owned_files", ()))
    job = ExportJob(concept=concept, mapper=load_mapper(concept), backbone=backbone, paths=paths, rank=rank,
                    vectors=vectors, model=model, model_config=model_config, device=device, progress=progress,
                    on_status=on_status, samples=samples, fit_steps=fit_steps, env=env)
    result = ExportResult(format=export_format, paths=paths)
    with _writing(paths):
        if len(paths) == 1 and getattr(code, "owned_files", ()):  # a folder: written whole, then swapped in
            with staged(paths[0], is_dir=True) as folder:
                code.export(job, result, folder)
        else:
            code.export(job, result)
    if export_format.distils:  # a file other tools trigger by its name
        _trigger_warnings(result, registry, concept, result.vectors, model or concept.base_model, model_config)
    return result


def _trigger_warnings(result: ExportResult, registry, concept, count: int, spec: str, model_config) -> None:
    from ..models.vocabulary import load_tokenizers
    from .ti import export_warnings, trigger_note

    result.notes.append(trigger_note(concept.name, count))
    result.warnings += export_warnings(concept.name, count, registry.names(), load_tokenizers(spec, model_config),
                                       spec)


# --------------------------------------------------------------------------- import


def import_concept(registry, path: Path, name: str | None = None, init: str | None = None, model: str | None = None,
                   model_config: str | None = None, env: Settings | None = None) -> ImportResult:
    """Read ``path`` and store it as a concept in ``registry``."""
    from ..store.conceptio import weights_bytes

    path = Path(path).expanduser()
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if init is not None and not init.strip():
        raise BadInput("the initializer word (--init) must be a word (e.g. dog), not empty; leave it out to take "
                       "the file's")
    request = ImportRequest(path, name, init, model, model_config, env or Settings.from_environment())
    reader = reader_of(path)
    if reader is None:
        raise BadInput(
            f"{path.name}: stc imports reference NeTI checkpoints (*-mapper.pt), textual-inversion embeddings "
            "(.safetensors, .pt, .bin), folders written by 'stc export --format diffusers' and concept folders of "
            "another registry"
        )
    imported = reader.code().read(request)
    concept = imported.concept
    notes = imported.notes + _check_width(concept, model or concept.base_model, model_config)
    registry.save(concept, weights_bytes(imported.mapper, concept.name), extra_files=imported.files)
    from ..models.vocabulary import load_tokenizers, name_warning

    spec = model or concept.base_model
    warning = name_warning(concept.name, load_tokenizers(spec, model_config), spec)
    return ImportResult(concept=registry.load(concept.name), source_format=imported.source_format, notes=notes,
                        warnings=[warning] if warning else [])


def _check_width(concept, spec: str, model_config: str | None) -> list[str]:
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
