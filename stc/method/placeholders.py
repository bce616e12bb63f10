"""A concept's placeholder tokens in a tokenizer: the one place they are named and added.

A concept ``<name>`` is one token; an imported embedding of n vectors is n tokens, named as
diffusers names them: ``<name>``, ``<name>_1``, …, ``<name>_{n-1}``, written in that order
wherever the prompt says ``<name>``. Training, rendering, distillation and the diffusers
export's module all add them through :func:`add_placeholder_tokens`.
"""

from __future__ import annotations

import difflib

from ..errors import BadInput


def placeholder_tokens(token: str, count: int = 1) -> list[str]:
    """The tokens of a placeholder with ``count`` vectors: ``<name>``, ``<name>_1``, …"""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


def add_placeholder_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` (once; adding them again is a no-op) and return their ids.

    A token that the tokenizer's own vocabulary already holds (not one added for a concept) is
    refused: the model would read its existing meaning instead of the concept.
    """
    vocabulary, added = tokenizer.get_vocab(), tokenizer.added_tokens_encoder
    known = [token for token in tokens if token in vocabulary and token not in added]
    if known:
        raise BadInput(f"the tokenizer already knows {known[0]!r} as a word of its own; choose another concept name")
    tokenizer.add_tokens([token for token in tokens if token not in added])
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def add_to_tokenizers(tokenizers: list, tokens: list[str]) -> list[list[int]]:
    """:func:`add_placeholder_tokens` in each tokenizer of a model (SDXL has two); their ids in each."""
    return [add_placeholder_tokens(tokenizer, tokens) for tokenizer in tokenizers]


def expand_placeholders(text: str, tokens: list[str]) -> str:
    """``text`` with each ``tokens[0]`` written as all of ``tokens`` (a no-op for one token)."""
    if len(tokens) < 2:
        return text
    return text.replace(tokens[0], " ".join(tokens))


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` if it is one token; otherwise a BadInput with alternatives."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    from .templates import COMMON_INITIALIZERS

    singles = [w for w in COMMON_INITIALIZERS if len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    close = difflib.get_close_matches(word.lower(), singles, n=3, cutoff=0.3) or singles[:5]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise BadInput(
        f"the initializer word {word!r} is {len(ids)} tokens ({' '.join(pieces)}) for this model's "
        f"tokenizer; it must be a single token. Try --init {close[0]} (or: {', '.join(close[1:]) or 'object'})"
    )
