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


def load_tokenizers(spec: str, model_config: str | None = None) -> list:
    """The tokenizers of model ``spec`` from local files only, without loading the model
    (``tokenizers.tokenizers_of``); an empty list when they cannot be had offline (a hub model never
    downloaded, a single file without ``--model-config``): the check is a courtesy, never a reason
    to fail."""
    from .base import BUILTINS
    from .tokenizers import tokenizers_of

    try:
        found = tokenizers_of(spec, model_config) or []
    except Exception:  # noqa: BLE001 (unreadable or absent tokenizer files: nothing to check against)
        return []
    if spec in BUILTINS:
        return found
    return [tokenizer for tokenizer in found if len(tokenizer.get_vocab()) > 256]  # a real byte-level BPE vocabulary
