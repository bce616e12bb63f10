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


def write_placeholder(text: str, token: str, words: str) -> str:
    """``text`` with each placeholder ``token`` (``<name>``) written as ``words``: its n tokens, an
    initializer word, or n embeddings' tokens (the one home of where a placeholder goes in a text)."""
    return text.replace(token, words)


def expand_placeholders(text: str, tokens: list[str]) -> str:
    """``text`` with each ``tokens[0]`` written as all of ``tokens`` (a no-op for one token)."""
    if len(tokens) < 2:
        return text
    return write_placeholder(text, tokens[0], " ".join(tokens))


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` if it is one token; otherwise a BadInput with alternatives drawn from
    the word itself (its pieces that are words of their own, close spellings in the vocabulary)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    close = initializer_alternatives(tokenizer, word, pieces)
    if close:
        advice = f"Try --init {close[0]}" + (f" (or: {', '.join(close[1:])})" if close[1:] else "")
    else:
        from .templates import COMMON_INITIALIZERS

        broad = [candidate for candidate in COMMON_INITIALIZERS if _single(tokenizer, candidate)][:3] or ["object"]
        advice = (f"No single-token word is close to it; name its broader kind, e.g. --init {broad[0]}"
                  + (f" (or: {', '.join(broad[1:])})" if broad[1:] else ""))
    raise BadInput(
        f"the initializer word {word!r} is {len(ids)} tokens ({' '.join(pieces)}) for this model's "
        f"tokenizer; it must be a single token. {advice}"
    )


WORD_END = "</w>"  # how CLIP's vocabulary marks a token that ends a word
FUNCTION_WORDS = frozenset("a an the of on in at to with and or by for from my is are as it its this that".split())


def initializer_alternatives(tokenizer, word: str, pieces: list[str], count: int = 3) -> list[str]:
    """Single-token words related to ``word``: its own words and pieces that are one token (the
    last first: "golden retriever" is a retriever), then close spellings from the vocabulary's
    whole words; none when nothing relates."""
    import re

    def single(candidate: str) -> bool:
        return candidate not in FUNCTION_WORDS and _single(tokenizer, candidate)

    letters = re.findall(r"[a-z]+", word.lower())
    own = [text for text in reversed(letters)] + [
        piece.removesuffix(WORD_END) for piece in reversed(pieces) if piece.removesuffix(WORD_END).isalpha()]
    found = [candidate for candidate in dict.fromkeys(own) if len(candidate) > 1 and single(candidate)]
    whole_words = [token.removesuffix(WORD_END) for token in tokenizer.get_vocab()
                   if token.endswith(WORD_END) and token.removesuffix(WORD_END).isalpha() and len(token) > 5]
    for target in dict.fromkeys(["".join(letters), *(text for text in letters if text not in FUNCTION_WORDS)]):
        found += difflib.get_close_matches(target, whole_words, n=count, cutoff=0.75)
    return [candidate for candidate in dict.fromkeys(found) if single(candidate)][:count]


def _single(tokenizer, word: str) -> bool:
    return len(tokenizer.encode(word, add_special_tokens=False)) == 1
