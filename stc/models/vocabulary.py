"""Concept names against a base model's vocabulary: how other tools would trigger a textual-inversion
file of that name, and when that takes a word away from every prompt.

Other tools name an embedding after its file, not after stc's ``<name>``:

- the A1111 webui triggers ``<file name>`` wherever its tokens appear in a prompt, so a file
  called ``dog.pt`` replaces every "dog" (``modules/textual_inversion``);
- ComfyUI triggers it only by ``embedding:<file name>``, so plain words are safe there;
- kohya's scripts add the file name (and ``name1``, ``name2``, … for more vectors) to the
  tokenizer and stop when a token already exists;
- diffusers' ``load_textual_inversion`` uses the ``token=`` it is given, else the file's own
  (an a1111 file's ``name``) and refuses one already in the vocabulary.

So a name that is one token of the vocabulary (or an entry of it) is a name those tools
misread. :func:`name_warning` says so; ``stc train``, ``import`` and ``export`` print it.
"""

from __future__ import annotations

from pathlib import Path

from .backbones import tokenizer_components


def is_vocabulary_word(name: str, tokenizers) -> bool:
    """Whether ``name`` is a single token of any of ``tokenizers`` (as the webui reads a prompt)
    or an entry of its vocabulary (as diffusers checks a new token)."""
    for tokenizer in tokenizers:
        if len(tokenizer(name, add_special_tokens=False).input_ids) == 1 or name in tokenizer.get_vocab():
            return True
    return False


def name_warning(name: str, tokenizers, model: str) -> str | None:
    """The warning for a concept called ``name`` on ``model`` (whose ``tokenizers`` these are), or
    None when the name is no word of its vocabulary."""
    if not tokenizers or not is_vocabulary_word(name, tokenizers):
        return None
    return (
        f"'{name}' is a word of {model}'s vocabulary. stc is unaffected (it reads <{name}>), but a ti/a1111 export "
        f"is triggered by its file name '{name}': in the A1111 webui every '{name}' in a prompt becomes the "
        f"embedding; kohya's scripts refuse the file; diffusers refuses an a1111 file (its token is '{name}', "
        f"'already in tokenizer vocabulary') unless loaded with token='<{name}>'; ComfyUI is unaffected "
        f"('embedding:{name}'). Rename it to a made-up word (stc mv {name} {name}-sks)"
    )


TOKENIZER_FILES = ("vocab.json", "tokenizer.json")  # the slow tokenizer's files, or the fast one's


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizers(spec: str, model_config: str | None = None) -> list:
    """The tokenizers of model ``spec`` from local files only, without loading the model; an empty
    list when they cannot be had offline (a hub model never downloaded, a single file without
    ``--model-config``): the check is a courtesy, never a reason to fail."""
    try:
        from .base import BUILTINS

        if spec in BUILTINS:  # the tokenizer alone (SDXL's second shares its vocabulary), not the model
            if spec.startswith("builtin:shapes"):
                from ..worlds.shapes.model import shapes_tokenizer

                return [shapes_tokenizer()]
            from .tiny import build_tiny_tokenizer

            return [build_tiny_tokenizer()]
        from transformers import CLIPTokenizer

        path = Path(spec).expanduser()
        folder = path if path.is_dir() else Path(model_config).expanduser() if model_config else None
        if folder is not None:
            found = [CLIPTokenizer.from_pretrained(str(folder / sub)) for sub in tokenizer_components()
                     if _has_tokenizer(folder / sub)]
            if not found and _has_tokenizer(folder):
                found = [CLIPTokenizer.from_pretrained(str(folder))]
            return [tokenizer for tokenizer in found if len(tokenizer.get_vocab()) > 256]
        if path.exists() or spec.count("/") != 1:
            return []
        from huggingface_hub import try_to_load_from_cache

        from .backbones.single_file import _hub_cache  # the cache the environment names now (HF_HUB_CACHE, HF_HOME)

        cached = [try_to_load_from_cache(spec, f"tokenizer/{name}", cache_dir=_hub_cache()) for name in TOKENIZER_FILES]
        cached = next((path for path in cached if isinstance(path, str)), None)
        if cached is None:  # never downloaded (transformers would build an empty tokenizer)
            return []
        found = [CLIPTokenizer.from_pretrained(str(Path(cached).parent))]
    except Exception:  # noqa: BLE001 (unreadable or absent tokenizer files: nothing to check against)
        return []
    return [tokenizer for tokenizer in found if len(tokenizer.get_vocab()) > 256]  # a real byte-level BPE vocabulary
