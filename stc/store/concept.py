"""A concept's metadata: ``concept.yaml`` as typed records, its schema and migrations.

The file's keys, the schema versions and the migration policy are specified in
``docs/concept-format.md``. Torch-free: ``stc ls`` reads these records without importing torch.
Keys this version does not know are kept (``extra``) and written back unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import CorruptConcept, UnsupportedSchema

SCHEMA_VERSION = 1
CONCEPT_FILE = "concept.yaml"
WEIGHTS_FILE = "mapper.safetensors"


# --------------------------------------------------------------------------- migrations


def _migrate_0_to_1(data: dict) -> dict:
    """Schema 0 (before stc 0.1; no ``schema_version``): the weights hash was stored as
    ``sha256`` and there was no ``metrics`` mapping."""
    data = dict(data)
    if "sha256" in data and "weights_sha256" not in data:
        data["weights_sha256"] = data.pop("sha256")
    data.setdefault("metrics", {})
    data["schema_version"] = 1
    return data


MIGRATIONS = {0: _migrate_0_to_1}  # version -> function returning the next version's mapping


def migrate(data: dict, source: Path) -> dict:
    """Bring a ``concept.yaml`` mapping up to :data:`SCHEMA_VERSION` (``source`` names the file)."""
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CorruptConcept(f"{source} has an invalid schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise UnsupportedSchema(
            f"{source} has schema version {version}, newer than this stc understands ({SCHEMA_VERSION}); "
            "upgrade stc (pip install -U stc)"
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version = data["schema_version"]
    return data


# --------------------------------------------------------------------------- records


def _optional(kind: type, value):
    """``value`` as ``kind`` (int or float), or None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


@dataclass
class TrainingRecord:
    """``training``: the run's settings and what it resolved.

    ``settings`` is the plain mapping ``concept.yaml`` holds: the fields of
    :class:`stc.train.config.TrainConfig` (which turns it into one) and any key a newer stc wrote.
    The registry keeps it as it is and reads one thing from it, the planned ``steps``; empty for
    concepts stc did not train (imports, which record where they came from instead).
    """

    settings: dict = field(default_factory=dict)
    steps_done: int | None = None
    resolution: int | None = None
    effective_lr: float | None = None
    num_processes: int | None = None
    photos: list[str] = field(default_factory=list)
    photos_dir: str | None = None
    imported_from: str | None = None  # the file or folder an imported concept was read from
    source_format: str | None = None  # its format ("neti", "ti", "a1111", "diffusers-ti", "stc-diffusers")

    RUN_KEYS = ("steps_done", "resolution", "effective_lr", "num_processes", "photos", "photos_dir", "imported_from",
                "source_format")

    @property
    def steps_planned(self) -> int | None:
        return _optional(int, self.settings.get("steps"))

    def to_dict(self) -> dict:
        data = {key: value for key, value in self.settings.items() if key not in self.RUN_KEYS}  # the run's own
        data.update({key: getattr(self, key) for key in self.RUN_KEYS if getattr(self, key) not in (None, [])})
        return data

    @classmethod
    def from_dict(cls, data: dict, source: Path) -> "TrainingRecord":
        text = lambda key: str(data[key]) if data.get(key) else None  # noqa: E731
        return cls(
            settings={key: value for key, value in data.items() if key not in cls.RUN_KEYS},
            steps_done=_optional(int, data.get("steps_done")),
            resolution=_optional(int, data.get("resolution")),
            effective_lr=_optional(float, data.get("effective_lr")),
            num_processes=_optional(int, data.get("num_processes")),
            photos=[str(photo) for photo in data.get("photos") or []],
            photos_dir=text("photos_dir"), imported_from=text("imported_from"), source_format=text("source_format"),
        )


@dataclass
class MetricsRecord:
    """``metrics``: losses and time of the training run (None where not measured)."""

    final_loss: float | None = None  # mean training loss of the last 20 steps
    eval_loss_before: float | None = None  # denoising loss on the fixed evaluation set
    eval_loss_after: float | None = None
    seconds: float | None = None  # training time, resumed runs included
    extra: dict = field(default_factory=dict)

    KEYS = ("final_loss", "eval_loss_before", "eval_loss_after", "seconds")

    def to_dict(self) -> dict:
        data = {}
        for key in self.KEYS:
            value = getattr(self, key)
            if value is not None:
                data[key] = round(value, 6) if math.isfinite(value) else value
        data.update({key: value for key, value in self.extra.items() if key not in data})
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MetricsRecord":
        values = {key: _optional(float, data.get(key)) for key in cls.KEYS}
        return cls(**values, extra={k: v for k, v in data.items() if k not in cls.KEYS})


KNOWN_KEYS = (
    "schema_version", "stc_version", "name", "token", "initializer", "base_model", "text_width",
    "layer_names", "mapper", "training", "metrics", "created", "weights_sha256", "base_fingerprint", "eval",
)
REQUIRED_KEYS = ("name", "base_model", "initializer", "text_width", "layer_names", "mapper")


@dataclass
class Concept:
    """A concept's metadata (``concept.yaml``); weights live in ``mapper.safetensors``."""

    name: str
    base_model: str
    initializer: str
    text_width: int
    layer_names: list[str]
    mapper: dict  # MapperConfig.to_dict(): what rebuilds the mapper
    training: TrainingRecord = field(default_factory=TrainingRecord)
    metrics: MetricsRecord = field(default_factory=MetricsRecord)
    weights_sha256: str = ""
    created: str = ""
    base_fingerprint: str = ""  # of the base model's token-embedding table (models.embedding_fingerprint)
    stc_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    path: Path | None = None
    extra: dict = field(default_factory=dict)  # keys this stc does not know; written back as they are
    evaluation: dict = field(default_factory=dict)  # ``eval``: the latest stc eval (protocol.eval_summary)
    migrated_from: int | None = None  # schema version of the file on disk, when older than ours
    # (device, inode, mtime, ctime) of the concept.yaml this was read from: a reader that finds the
    # weights changed can tell a re-save (a new file, even one with the same content) from damage
    source_stamp: tuple | None = field(default=None, compare=False, repr=False)

    @property
    def token(self) -> str:
        return f"<{self.name}>"

    @property
    def weights_path(self) -> Path:
        assert self.path is not None
        return self.path / WEIGHTS_FILE

    @property
    def steps_planned(self) -> int | None:
        return self.training.steps_planned

    @property
    def steps_done(self) -> int | None:
        done = self.training.steps_done
        return done if done is not None else self.steps_planned

    @property
    def complete(self) -> bool:
        """False while training has stopped short of its planned steps (resumable)."""
        done, planned = self.steps_done, self.steps_planned
        return done is None or planned is None or done >= planned

    @property
    def encoder_widths(self) -> list[int]:
        """The widths of the text encoders it was trained for (SDXL: two), as its mapper records them."""
        widths = self.mapper.get("encoder_widths")
        return [int(width) for width in widths] if widths else [self.text_width]

    @property
    def rank_max(self) -> int | None:
        """The highest truncation rank: the mapper's hidden size (rank r keeps dims [:r]); None
        for a concept without ranks (no nested dropout: ``MapperConfig.rank_max``)."""
        from ..method.mapper_config import rank_max_of

        return rank_max_of(self.mapper)

    def to_yaml_dict(self) -> dict:
        data = {
            "schema_version": SCHEMA_VERSION,
            "stc_version": self.stc_version,
            "name": self.name,
            "token": self.token,
            "initializer": self.initializer,
            "base_model": self.base_model,
            "text_width": self.text_width,
            "layer_names": list(self.layer_names),
            "mapper": dict(self.mapper),
            "training": self.training.to_dict(),
            "metrics": self.metrics.to_dict(),
            "created": self.created,
            "weights_sha256": self.weights_sha256,
        }
        if self.base_fingerprint:
            data["base_fingerprint"] = self.base_fingerprint
        if self.evaluation:
            data["eval"] = dict(self.evaluation)
        data.update({key: value for key, value in self.extra.items() if key not in data})
        return data

    @classmethod
    def from_yaml_dict(cls, data: dict, path: Path) -> "Concept":
        source = path / CONCEPT_FILE
        original_version = data.get("schema_version", 0)
        data = migrate(data, source)
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise CorruptConcept(f"{source} lacks {', '.join(missing)}")
        try:
            concept = cls(
                name=_expect(data, "name", str, source),
                base_model=str(data["base_model"]),
                initializer=str(data["initializer"]),
                text_width=int(data["text_width"]),
                layer_names=[str(name) for name in _expect(data, "layer_names", list, source)],
                mapper=dict(_expect(data, "mapper", dict, source)),
                training=TrainingRecord.from_dict(_expect(data, "training", dict, source, default={}), source),
                metrics=MetricsRecord.from_dict(_expect(data, "metrics", dict, source, default={})),
                weights_sha256=str(data.get("weights_sha256") or ""),
                created=str(data.get("created") or ""),
                base_fingerprint=str(data.get("base_fingerprint") or ""),
                evaluation=dict(data["eval"]) if isinstance(data.get("eval"), dict) else {},
                stc_version=str(data.get("stc_version") or ""),
                schema_version=SCHEMA_VERSION,
                path=path,
                extra={key: value for key, value in data.items() if key not in KNOWN_KEYS},
                migrated_from=original_version if original_version != SCHEMA_VERSION else None,
            )
        except (TypeError, ValueError) as exc:
            raise CorruptConcept(f"{source} has a value of the wrong type: {exc}") from exc
        if concept.name != path.name:
            raise CorruptConcept(
                f"{source} names the concept {concept.name!r} but its folder is {path.name!r}; "
                f"set 'name: {path.name}' in the file, or move the folder back"
            )
        return concept


def _expect(data: dict, key: str, kind: type, source: Path, default=None):
    value = data.get(key, default)
    if value is None and default is not None:
        value = default
    if not isinstance(value, kind):
        raise CorruptConcept(f"{source}: '{key}' should be a {kind.__name__}, not {type(value).__name__}")
    return value
