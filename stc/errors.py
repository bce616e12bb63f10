"""Errors with messages ready to show to a user.

Library code raises these; the CLI prints ``Error: <message>`` and exits 1 for every kind (a
bad name, a missing concept, a rank, a file, an option's value), 130 for :class:`Interrupted`;
exit 2 is Click's, for a command line it cannot parse (an unknown option, a missing argument).
"""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's message on one line for a message of ours: whitespace collapsed, and a long
    one cut at its last sentence (else word) that fits in ``limit`` characters, marked with '…'."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit]
    sentence = cut.rfind(". ")
    if sentence > limit // 3:
        return cut[: sentence + 1]
    return cut[: cut.rfind(" ")].rstrip(",;:") + " …" if " " in cut else cut + "…"


class StcError(Exception):
    """Base class: the message says what went wrong and what to do next."""


class ConceptNotFound(StcError):
    pass


class ConceptExists(StcError):
    pass


class InvalidName(StcError):
    pass


class CorruptConcept(StcError):
    pass


class BadInput(StcError):
    """User-supplied data (photos, words, prompts, options) cannot be used."""


class ModelError(StcError):
    """A base model cannot be resolved, loaded, or does not fit a concept."""


class UnsupportedSchema(CorruptConcept):
    """A concept.yaml written by a newer stc (schema_version above this one's)."""


class DamagedWeights(CorruptConcept):
    """A concept's weights file is missing, truncated, or does not match its recorded sha256."""


class ConfirmationRequired(StcError):
    """A destructive command needs a yes and cannot ask for one (no terminal), or was declined."""


class ConceptBusy(StcError):
    """Another process is training the concept: it owns the name until it stops."""


class RegistryWriteError(StcError):
    """The registry could not be written (permissions, a full disk); the previous state is kept."""


class Interrupted(StcError):
    """Ctrl-C or SIGTERM stopped long work; the message says what was kept. Exit code 130."""

    exit_code = 130
