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
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import BadInput

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


def target_paths(format_name: str, name: str, out: Path) -> list[Path]:
    """Where an export of concept ``name`` goes inside the folder ``out``."""
    return {
        "diffusers": [out / name],
        "ti": [out / f"{name}.safetensors"],
        "a1111": [out / f"{name}.pt"],
        "neti": [out / f"{name}-mapper.pt", out / f"{name}-learned_embeds.bin"],
    }[format_name]


def check_targets(paths: list[Path], force: bool) -> None:
    """Refuse existing targets (unless ``force``) and folders that cannot be written, before any work."""
    existing = [path for path in paths if path.exists() or path.is_symlink()]
    if existing and not force:
        raise BadInput(f"{existing[0]} exists already; pass --force to replace it, or choose another --out")
    folder = paths[0].parent
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"--out {folder} is a file; give a folder")
    try:  # a real write, before any work: permissions, read-only file systems, quotas
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".stc-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"cannot write into {folder}: {exc.strerror or exc}; choose another --out") from exc


# --------------------------------------------------------------------------- writing atomically


@contextlib.contextmanager
def _staged(target: Path, is_dir: bool = False):
    """A temporary file or folder beside ``target``, moved onto it when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o755 if is_dir else 0o644)
        if is_dir and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(temporary, target)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


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


def write_ti(vectors, path: Path) -> None:
    """``emb_params`` [n, D]: the single-key layout diffusers, A1111, ComfyUI and kohya load."""
    from safetensors.torch import save

    with _staged(path) as temporary:
        temporary.write_bytes(save({"emb_params": vectors.detach().float().cpu().contiguous()},
                                   metadata={"format": "stc-ti", "stc_version": __version__}))


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
    import torch

    with _staged(path) as temporary:
        torch.save(a1111_embedding(vectors, name, steps, checkpoint_name), temporary)


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
    import torch

    if concept.text_width != REFERENCE_TEXT_WIDTH:
        raise BadInput(
            f"the reference implementation supports text width {REFERENCE_TEXT_WIDTH} (SD 1.x) only; "
            f"{concept.name} has width {concept.text_width} ({concept.base_model})"
        )
    state = mapper.state_dict()
    cls = _positional_encoding_class()
    encoder = cls(state["encoding.w"].detach().float().cpu().clone(), float(concept.mapper.get("sigma_t", 0.03)),
                  float(concept.mapper.get("sigma_l", 2.0)))
    checkpoint = {"state_dict": reference_state_dict(state), "cfg": reference_cfg(concept), "encoder": encoder}
    mapper_path, embeds_path = paths
    with _staged(mapper_path) as temporary, _reference_modules(cls):
        torch.save(checkpoint, temporary)
    with _staged(embeds_path) as temporary:
        torch.save({concept.token: mean_token(mapper).clone()}, temporary)


def mean_token(mapper, rank: int | None = None):
    """The mapper's token embedding averaged over t in 0..999 and the 16 layers: D."""
    import torch

    from .spacetime import spacetime_rows

    with torch.no_grad():
        rows_t, rows_l = spacetime_rows(torch.arange(0, 1000, 10), mapper.config.num_layers)
        token, _ = mapper.split(mapper(rows_t, rows_l, rank=rank))
    return token.mean(dim=0)


# --------------------------------------------------------------------------- the command


def export_concept(
    registry, name: str, format_name: str, out: Path | None = None, rank: int | None = None, vectors: int = 1,
    force: bool = False, model: str | None = None, model_config: str | None = None, device: str | None = None,
    progress: Callable[[int, int], None] | None = None, on_status: Callable[[str], None] | None = None,
    samples: int = 256, fit_steps: int = 200,
) -> ExportResult:
    """Export concept ``name`` as ``format_name`` into the folder ``out`` (default: the current one)."""
    from .conceptio import load_mapper
    from .prompts import ParsedPrompt, resolve_ranks

    export_format = check_format(format_name)
    concept = registry.load(name)
    if rank is not None:
        resolve_ranks(ParsedPrompt(concept.token, {name: rank}), {name: concept.rank_max})
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
            from .registry import preview_paths

            previews = [p for p in preview_paths(concept.path) if p.name == "preview.png"]
            with _staged(paths[0], is_dir=True) as folder:
                write_diffusers_export(concept, concept.weights_path.read_bytes(), folder, rank=rank,
                                       preview=previews[0] if previews else None)
        elif format_name == "neti":
            write_neti(concept, mapper, paths)  # the mapper alone: no base model needed
        else:
            result.fidelity = _distil_and_write(concept, mapper, format_name, paths[0], rank, vectors, model,
                                                model_config, device, progress, on_status, samples, fit_steps)
    return result


def _distil_and_write(concept, mapper, format_name, path, rank, vectors, model, model_config, device, progress,
                      on_status, samples, fit_steps):
    from .distill import distil
    from .models import load_base_model

    spec = model or concept.base_model
    if on_status:
        on_status(f"loading {spec}")
    base = load_base_model(spec, device=device, config=model_config)
    distilled = distil(base, concept, mapper, vectors=vectors, rank=rank, samples=samples, steps=fit_steps,
                       progress=progress)
    if format_name == "ti":
        write_ti(distilled.vectors, path)
    else:
        write_a1111(distilled.vectors, path, concept.name, concept.steps_done or 0, base.spec)
    return distilled.fidelity
