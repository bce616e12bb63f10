"""Exporting a concept to the formats other tools read; each says what it keeps and loses.

| format      | files                                          | read by                                   |
|-------------|------------------------------------------------|-------------------------------------------|
| `diffusers` | `<name>/` (module, weights, config, card)      | plain diffusers, with the bundled module  |
| `ti`        | `<name>.safetensors` (`emb_params` [n, D])     | diffusers, A1111, ComfyUI, kohya          |
| `a1111`     | `<name>.pt` (`string_to_param` {'*': [n, D]})  | the A1111 webui (`weights_only` loadable) |
| `neti`      | `<name>-mapper.pt`, `<name>-learned_embeds.bin`| the reference implementation's scripts    |

Exporting only reads the registry. Files are written beside their target and moved into
place, so a failed export leaves nothing half-written; an existing target is refused unless
``force``.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import BadInput
from ..outputs import check_folder, refuse_existing, staged

# (samples, fit steps) of the ti/a1111 distillation: the default fit and the thorough one
# (--thorough). The fit's cost is about samples x steps; on builtin:shapes the fast fit's denoiser
# error is within a few per cent of the thorough one's (QUALITY.md, python -m benchmarks.quality).
FAST = (64, 30)
THOROUGH = (256, 200)
A1111_STAR_TOKEN = 265  # CLIP's id of '*', the key every A1111 embedding uses
REFERENCE_TEXT_WIDTH = 768  # the reference implementation hard-codes SD 1.x's text width


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


@dataclass
class ExportResult:
    format: ExportFormat
    paths: list[Path]
    fidelity: object | None = None  # distill.Fidelity for the lossy formats
    exact: bool = False  # ti/a1111 of a textual-inversion concept: its own vectors, nothing distilled


def target_paths(format_name: str, name: str, out: Path) -> list[Path]:
    """Where an export of concept ``name`` goes inside the folder ``out``."""
    return {
        "diffusers": [out / name],
        "ti": [out / f"{name}.safetensors"],
        "a1111": [out / f"{name}.pt"],
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
            from .export_diffusers import EXPORT_FILES

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


# --------------------------------------------------------------------------- the formats


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


# The zip members a torch checkpoint needs: its pickle, its tensors' storages, its version. The
# A1111 webui's safe unpickler (modules/safe.py) refuses a file with any other member, and today's
# torch.save also writes .format_version, .storage_alignment, byteorder and .data/serialization_id.
_NEEDED_MEMBER = re.compile(r"data\.pkl|version|data/\d+")
_ZIP_ALIGNMENT = 64  # torch aligns storages to 64 bytes in the archive (its reader does not need it)
_PADDING_FIELD = 0x4246  # the zip "extra" field id torch's own writer pads with ("FB")


def portable_torch_save(obj, folder: str) -> bytes:
    """``torch.save(obj)`` as bytes whose archive holds only ``<folder>/data.pkl``,
    ``<folder>/data/<n>`` and ``<folder>/version``: every torch since 1.6 reads it
    (``torch.load(weights_only=True)`` included, little-endian being the default byte order)
    and so does the webui's default safe loader. Deterministic: the same object gives the same bytes."""
    import io
    import struct
    import zipfile

    import torch

    written = io.BytesIO()
    torch.save(obj, written)
    out = io.BytesIO()
    with zipfile.ZipFile(written) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            member = info.filename.split("/", 1)[1]
            if not _NEEDED_MEMBER.fullmatch(member):
                continue
            entry = zipfile.ZipInfo(f"{folder}/{member}", date_time=(1980, 1, 1, 0, 0, 0))
            header = 30 + len(entry.filename.encode()) + 4  # local header, name, padding field's own header
            padding = -(out.tell() + header) % _ZIP_ALIGNMENT
            entry.extra = struct.pack("<HH", _PADDING_FIELD, padding) + b"Z" * padding
            target.writestr(entry, source.read(info))
    return out.getvalue()


def reference_state_dict(state_dict: dict) -> dict:
    """stc's mapper weights in the reference model's layout: ``input_layer.*`` and the identical
    ``net.0.*`` (one module registered twice), no ``encoder.w`` (a CUDA-written checkpoint has none)."""
    converted = {key: value.detach().float().cpu() for key, value in state_dict.items() if key != "encoding.w"}
    converted["input_layer.weight"] = converted["net.0.weight"]  # the same tensor, as in the reference
    converted["input_layer.bias"] = converted["net.0.bias"]
    order = ["input_layer.weight", "input_layer.bias"] + [key for key in converted if not key.startswith("input_layer")]
    return {key: converted[key] for key in order}


def reference_cfg(concept) -> dict:
    """``pyrallis.encode(RunConfig)`` of the reference for ``concept``: a plain dict."""
    mapper, record = concept.mapper, concept.training
    config = record.config
    return {
        "log": {"exp_name": concept.name, "exp_dir": "outputs", "save_steps": 250, "logging_dir": "logs",
                "report_to": "tensorboard", "checkpoints_total_limit": None},
        "data": {"train_data_dir": record.photos_dir or "photos", "placeholder_token": concept.token,
                 "super_category_token": concept.initializer, "dataloader_num_workers": 8,
                 "learnable_property": config.kind if config else "object", "repeats": 100,
                 "resolution": record.resolution or 512, "center_crop": False},
        "model": {"pretrained_model_name_or_path": concept.base_model,
                  "use_nested_dropout": bool(mapper.get("nested_dropout", True)),
                  "nested_dropout_prob": float(mapper.get("nested_dropout_prob", 0.5)),
                  "normalize_mapper_output": True, "target_norm": float(mapper["norm_scale"]),
                  "use_positional_encoding": True,
                  "pe_sigmas": {"sigma_t": float(mapper.get("sigma_t", 0.03)), "sigma_l": float(mapper.get("sigma_l", 2.0))},
                  "num_pe_time_anchors": int(mapper.get("num_time_anchors", 10)),
                  "output_bypass": bool(mapper.get("bypass", True)), "revision": None, "mapper_checkpoint_path": None},
        "eval": {"validation_prompts": ["A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                                        "A painting of {} in the style of Monet"],
                 "num_validation_images": 4, "validation_seeds": [42, 420, 501, 5456], "validation_steps": 100,
                 "num_denoising_steps": 50},
        "optim": {"max_train_steps": concept.steps_done or 1000,
                  "learning_rate": config.lr if config else 1e-3, "scale_lr": config.scale_lr if config else True,
                  "train_batch_size": config.batch_size if config else 2, "gradient_checkpointing": False,
                  "gradient_accumulation_steps": config.grad_accum if config else 4,
                  "seed": config.seed if config else None, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "adam_beta1": config.adam_beta1 if config else 0.9, "adam_beta2": config.adam_beta2 if config else 0.999,
                  "adam_weight_decay": config.adam_weight_decay if config else 1e-2,
                  "adam_epsilon": config.adam_epsilon if config else 1e-8,
                  "mixed_precision": config.mixed_precision if config else "no", "allow_tf32": False},
    }


def _positional_encoding_class():
    """A stand-in class that pickles as ``models.positional_encoding.NeTIPositionalEncoding``."""
    from torch import nn

    class NeTIPositionalEncoding(nn.Module):
        def __init__(self, w, sigma_t: float, sigma_l: float):
            super().__init__()
            self.sigma_t, self.sigma_l, self.num_w = sigma_t, sigma_l, int(w.shape[0])
            self.w = w  # a plain attribute, as the reference's CUDA runs leave it (not in state_dict)

    NeTIPositionalEncoding.__module__ = "models.positional_encoding"
    NeTIPositionalEncoding.__qualname__ = "NeTIPositionalEncoding"
    return NeTIPositionalEncoding


@contextlib.contextmanager
def _reference_modules(cls):
    """Make ``models.positional_encoding`` importable for the pickler while it writes, then remove it."""
    saved = {name: sys.modules.get(name) for name in ("models", "models.positional_encoding")}
    package, module = types.ModuleType("models"), types.ModuleType("models.positional_encoding")
    module.NeTIPositionalEncoding, package.positional_encoding = cls, module
    sys.modules.update({"models": package, "models.positional_encoding": module})
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def write_neti(concept, mapper, paths: list[Path]) -> None:
    """The reference pair: ``<name>-mapper.pt`` and ``<name>-learned_embeds.bin``."""

    if concept.text_width != REFERENCE_TEXT_WIDTH:
        raise BadInput(
            f"the reference implementation supports text width {REFERENCE_TEXT_WIDTH} (SD 1.x) only; "
            f"{concept.name} has width {concept.text_width} ({concept.base_model})"
        )
    from .distill import mean_token

    state = mapper.state_dict()
    cls = _positional_encoding_class()
    encoder = cls(state["encoding.w"].detach().float().cpu().clone(), float(concept.mapper.get("sigma_t", 0.03)),
                  float(concept.mapper.get("sigma_l", 2.0)))
    checkpoint = {"state_dict": reference_state_dict(state), "cfg": reference_cfg(concept), "encoder": encoder}
    mapper_path, embeds_path = paths
    with staged(mapper_path) as temporary, _reference_modules(cls):
        temporary.write_bytes(portable_torch_save(checkpoint, mapper_path.stem))
    with staged(embeds_path) as temporary:
        temporary.write_bytes(portable_torch_save({concept.token: mean_token(mapper)}, embeds_path.stem))


# --------------------------------------------------------------------------- the command


def export_concept(
    registry, name: str, format_name: str, out: Path | None = None, rank: int | None = None, vectors: int = 1,
    force: bool = False, model: str | None = None, model_config: str | None = None, device: str | None = None,
    progress: Callable[[int, int], None] | None = None, on_status: Callable[[str], None] | None = None,
    samples: int | None = None, fit_steps: int | None = None, thorough: bool = False,
) -> ExportResult:
    """Export concept ``name`` as ``format_name`` into the folder ``out`` (default: the current one).

    ti/a1111 distil the concept: ``samples`` and ``fit_steps`` default to the fast fit (seconds),
    or with ``thorough`` to the thorough one (minutes).
    """
    preset = THOROUGH if thorough else FAST
    samples = preset[0] if samples is None else samples
    fit_steps = preset[1] if fit_steps is None else fit_steps
    from ..store.conceptio import load_mapper
    from ..render.prompts import check_rank

    export_format = check_format(format_name)
    concept = registry.load(name)
    if rank is not None:
        check_rank(concept.name, rank, concept.rank_max, f"--rank {rank}")
    for flag, value in (("--vectors", vectors), ("--samples", samples), ("--fit-steps", fit_steps)):
        if value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}")
    paths = target_paths(format_name, name, Path(out or ".").expanduser())
    check_targets(paths, force)
    mapper = load_mapper(concept)
    result = ExportResult(format=export_format, paths=paths)
    with _writing(paths):
        if format_name == "diffusers":
            from .export_diffusers import write_diffusers_export
            from ..store.registry import preview_paths

            previews = [p for p in preview_paths(concept.path) if p.name == "preview.png"]
            with staged(paths[0], is_dir=True) as folder:
                write_diffusers_export(concept, concept.weights_path.read_bytes(), folder, rank=rank,
                                       preview=previews[0] if previews else None)
        elif format_name == "neti":
            write_neti(concept, mapper, paths)  # the mapper alone: no base model needed
        else:
            exact = constant_vectors(mapper)
            if exact is not None:  # a textual-inversion concept: its vectors as they are, nothing to fit
                result.exact = True
                fitted, spec = exact, concept.base_model
            else:
                fitted, spec, result.fidelity = _distil(concept, mapper, rank, vectors, model, model_config,
                                                        device, progress, on_status, samples, fit_steps)
            if format_name == "ti":
                write_ti(fitted, paths[0], spec)
            else:
                write_a1111(fitted, paths[0], concept.name, concept.steps_done or 0, spec)
    return result


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


def _distil(concept, mapper, rank, vectors, model, model_config, device, progress, on_status, samples, fit_steps):
    from .distill import distil
    from ..models.base import load_base_model

    spec = model or concept.base_model
    if on_status:
        on_status(f"loading {spec}")
    base = load_base_model(spec, device=device, config=model_config)
    distilled = distil(base, concept, mapper, vectors=vectors, rank=rank, samples=samples, steps=fit_steps,
                       progress=progress)
    return distilled.vectors, base.spec, distilled.fidelity
