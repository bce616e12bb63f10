"""The exchange formats stc knows: one registration each.

A registration names the format, says what it keeps and loses, which families it can hold,
whether it distils, and where its code is: a module (imported only when the format is used,
so ``stc export --help`` loads no torch) with up to four functions:

- ``targets(name, out, backbone) -> list[Path]``: where an export of concept ``name`` goes in ``out``;
- ``export(job: common.ExportJob, result: common.ExportResult)``: write the files;
- ``read(request: common.ImportRequest) -> common.Imported``: ``stc import`` of a file or folder;
- ``owned_files`` (a tuple, optional): the files a folder export writes (``--force`` replaces
  only those).

``accepts(path)`` says, from the path alone, whether the format reads it; no two formats accept
the same path (``stc import`` reads with the one that does). Adding a format: one module with
those functions and one ``register(...)`` below (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput


@dataclass(frozen=True)
class Format:
    name: str
    keeps: str  # what an export keeps of a concept ("" for a format stc only reads)
    loses: str
    module: str  # its code: targets / export / read
    accepts: Callable[[Path], bool] | None = None  # stc import: whether it reads this path
    exports: bool = True  # stc export writes it
    distils: bool = False  # an export distils the concept into plain vectors (a model loads)
    families: tuple[str, ...] | None = None  # the backbones (by name) it can hold (None: every one)
    refusal: str = ""  # why a concept of another family cannot be held

    def code(self):
        return importlib.import_module(self.module)

    def holds(self, backbone) -> bool:
        return self.families is None or backbone.name in self.families


FORMATS: dict[str, Format] = {}  # every registered format, in import-dispatch order


def register(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def export_formats() -> dict[str, Format]:
    return {name: fmt for name, fmt in FORMATS.items() if fmt.exports}


def check_format(name: str) -> Format:
    formats = export_formats()
    if name not in formats:
        raise BadInput(f"unknown export format {name!r}; known formats: {', '.join(formats)}")
    return formats[name]


def reader_of(path: Path) -> Format | None:
    """The registered format that reads ``path``, or None."""
    return next((fmt for fmt in FORMATS.values() if fmt.accepts is not None and fmt.accepts(path)), None)


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def _registry_folder(path: Path) -> bool:
    """A concept folder of a registry, or a registry's top folder (it has a ``concepts`` folder)."""
    return path.is_dir() and ((path / "concept.yaml").is_file() or (path / "concepts").is_dir())


def _reference_checkpoint(path: Path) -> bool:
    return path.is_file() and path.name.endswith("-mapper.pt")


def _concept_file(path: Path) -> bool:
    from .concept_file import is_concept_file  # reads the header only: no torch

    return is_concept_file(path)

_LOSSY = "time and space (one embedding for every step and layer), the textual bypass and ranks"

register(Format(
    "stc-concept", keeps="", loses="", module="stc.exchange.concept_folder", exports=False,
    accepts=_registry_folder,
))
register(Format(
    "diffusers", module="stc.exchange.diffusers_folder",
    keeps="everything: the mapper for every timestep, layer and rank, and the textual bypass",
    loses="nothing; it renders through the bundled stc_concept.py (torch, diffusers, transformers)",
    accepts=lambda path: path.is_dir() and not _registry_folder(path),
))
register(Format(
    "ti", module="stc.exchange.ti", distils=True,
    keeps="n fixed vectors distilled from the concept at the chosen rank",
    loses=_LOSSY,
    accepts=lambda path: path.is_file() and path.suffix in EMBEDDING_SUFFIXES and not _reference_checkpoint(path)
    and not _concept_file(path),
))
register(Format(
    "a1111", module="stc.exchange.a1111", distils=True,
    keeps="the same distilled vectors as ti, in the webui's native .pt layout (SDXL: the ti file, which the "
          "webui reads)",
    loses=_LOSSY,
))
register(Format(
    "neti", module="stc.exchange.neti", families=("sd1",),
    keeps="the mapper exactly: every timestep, layer, rank and the bypass",
    loses="stc's metadata (training record, previews, sha256); SD 1.x text width (768) only",
    refusal="the neti format is the reference implementation's, which is SD 1.x only (text width 768). Export it "
            "as diffusers (lossless) or ti/a1111",
    accepts=_reference_checkpoint,
))
register(Format(
    "concept-file", module="stc.exchange.concept_file",
    keeps="the mapper exactly (every timestep, layer, rank and the bypass) in one .safetensors, its config, layers, "
          "token, initializer and family in the header",
    loses="previews; renders where a host loads it: ComfyUI through stc's nodes (stc comfyui install)",
    accepts=_concept_file,
))
