"""A base model's tokenizers without its weights, for checks that must come before a model loads
(``--init`` must be one token): seconds or less instead of the minute a real model takes.

Builtins build theirs from code; a diffusers folder (or a single file's ``--model-config``
folder) and a hub id in the local cache read the tokenizer subfolders the families' backbones name. Never the
network: where the tokenizers cannot be had cheaply, None, and the check waits for the model.
"""

from __future__ import annotations

from pathlib import Path

from .backbones import tokenizer_components

TOKENIZER_FOLDERS = tuple(tokenizer_components())  # every layout's tokenizer subfolders (the backbones')
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")  # the slow layout (vocab.json + merges.txt), or the fast one


def tokenizers_of(spec: str, model_config: str | None = None) -> list | None:
    """The tokenizers of base model ``spec`` (two for SDXL), or None when only loading the model
    would tell."""
    from .base import BUILTINS

    if spec in BUILTINS:
        from .tiny import builtin_tokenizers

        return builtin_tokenizers(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_tokenizers(path)
    if path.is_file():
        return _folder_tokenizers(Path(model_config).expanduser()) if model_config else None
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _cached_tokenizers(spec)
    return None


def _folder_tokenizers(folder: Path) -> list | None:
    """``folder``'s tokenizer subfolders (``tokenizer/``, SDXL's second too), or ``folder`` itself as a tokenizer."""
    def holds_one(candidate: Path) -> bool:
        return any((candidate / file).is_file() for file in TOKENIZER_FILES)

    found = [folder / name for name in TOKENIZER_FOLDERS if holds_one(folder / name)]
    if not found and holds_one(folder):
        found = [folder]
    return _load(found) if found else None


def _cached_tokenizers(model_id: str) -> list | None:
    from .base import _cached

    found = []
    for name in TOKENIZER_FOLDERS:  # the fast layout (tokenizer.json), else the slow one (vocab.json + merges.txt)
        files = [_cached(model_id, f"{name}/tokenizer.json")]
        if files[0] is None:
            files = [_cached(model_id, f"{name}/{file}") for file in ("vocab.json", "merges.txt")]
        if None in files:
            break
        found.append(files[0].parent)
    return _load(found) if found else None


def _load(folders: list[Path]) -> list | None:
    try:
        from transformers import CLIPTokenizer

        return [CLIPTokenizer.from_pretrained(str(folder), local_files_only=True) for folder in folders]
    except Exception:  # an incomplete or odd folder: the model's own load will say what is wrong
        return None
