"""Training settings: the hyper-parameters of a run, their defaults and their checks.

Defaults are the reference implementation's (``docs/method.md``). Every ``stc train`` option
and every key of a ``--config`` file is a field here; the command line defines no defaults of
its own. Torch-free: the registry reads these records without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import BadInput, one_line
from ..method.templates import DEFAULT_INITIALIZER, OBJECT_TEMPLATES, STYLE_TEMPLATES
from ..settings import MAX_SEED

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Training hyper-parameters; defaults are the reference implementation's."""

    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 4
    lr: float = 1e-3
    scale_lr: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    resolution: int | None = None  # None: the base model's native resolution
    seed: int = 0
    kind: str = "object"
    initializer: str | None = None  # None: "object", or "painting" for --kind style
    bypass: bool = True
    nested_dropout: bool = True
    nested_dropout_prob: float = 0.5
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    eval_samples: int = 8
    save_every: int = 250  # checkpoint every N steps (0: only at the end and on Ctrl-C)
    preview_every: int = 0  # render previews every N steps (0: only the final preview)
    preview_steps: int = 25  # denoising steps of preview renders

    def __post_init__(self) -> None:
        for item in fields(self):
            _check_type(item.name, item.type, getattr(self, item.name))
        for name in ("steps", "batch_size", "grad_accum", "eval_samples", "preview_steps"):
            if getattr(self, name) < 1:
                raise BadInput(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "preview_every"):
            if getattr(self, name) < 0:
                raise BadInput(f"{_flag(name)} must be 0 (off) or positive, got {getattr(self, name)}")
        _check_range("lr", self.lr, low=0.0, low_open=True)
        _check_range("adam_epsilon", self.adam_epsilon, low=0.0, low_open=True)
        _check_range("adam_weight_decay", self.adam_weight_decay, low=0.0)
        for name in ("adam_beta1", "adam_beta2"):
            _check_range(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        _check_range("nested_dropout_prob", self.nested_dropout_prob, low=0.0, high=1.0)
        if not 0 <= self.seed <= MAX_SEED:
            raise BadInput(f"seed (--seed) must lie between 0 and {MAX_SEED}, got {self.seed}")
        if self.kind not in DEFAULT_INITIALIZER:
            raise BadInput(f"kind (--kind) must be 'object' or 'style', not {self.kind!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise BadInput(f"mixed precision (--mixed-precision) must be one of {', '.join(MIXED_PRECISION)}, "
                           f"not {self.mixed_precision!r}")
        if self.initializer is not None and not self.initializer.strip():
            raise BadInput("the initializer word (--init) must be a word (e.g. dog), not empty; leave it out for the "
                           f"default ({DEFAULT_INITIALIZER[self.kind]!r})")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise BadInput(f"resolution (--resolution) must be a positive multiple of 8, got {self.resolution}")

    @property
    def initializer_word(self) -> str:
        return self.initializer or DEFAULT_INITIALIZER[self.kind]

    @property
    def templates(self) -> list[str]:
        return STYLE_TEMPLATES if self.kind == "style" else OBJECT_TEMPLATES

    def effective_lr(self, num_processes: int = 1) -> float:
        if not self.scale_lr:
            return self.lr
        return self.lr * self.batch_size * self.grad_accum * num_processes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def of(cls, record) -> "TrainConfig | None":
        """The settings a concept's training record holds (``TrainingRecord.settings``), or None
        for a concept stc did not train; settings that are not valid make a damaged concept."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in record.settings.items() if key in known}
        if not values:
            return None
        if values.get("resolution") is None and record.resolution is not None:
            values["resolution"] = record.resolution  # the run resolved it (the model's, when not given)
        try:
            return cls(**values)
        except (BadInput, TypeError, ValueError) as exc:
            from ..errors import CorruptConcept

            raise CorruptConcept(f"the training settings recorded for this concept are not valid: {exc}") from exc

    def record_settings(self, previous: dict | None = None) -> dict:
        """``TrainingRecord.settings`` for these settings, keeping the keys of ``previous`` (a
        resumed concept's) that this stc does not know."""
        from ..store.concept import TrainingRecord

        known = {f.name for f in fields(self)}
        settings = {**{k: v for k, v in (previous or {}).items() if k not in known}, **self.to_dict()}
        return {key: value for key, value in settings.items() if key not in TrainingRecord.RUN_KEYS}

    @classmethod
    def from_file(cls, path: Path, overrides: dict) -> "TrainConfig":
        """Settings from a YAML file (keys are the option names: ``weight-decay``, ``init``,
        ``batch-size``, ...; ``_`` works for ``-``), then ``overrides`` (explicit flags) on top."""
        import yaml

        from ..safe_yaml import yaml_load

        try:
            data = yaml_load(Path(path).expanduser().read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read the config file {path}: {one_line(exc)}") from exc
        if not isinstance(data, dict):
            raise BadInput(f"{path} must hold a mapping of option: value (e.g. 'steps: 1500')")
        settings = {}
        for key, value in data.items():
            name = config_key(key)
            if name is None:
                raise BadInput(f"{path}: unknown setting {key!r}. Known: {', '.join(sorted(CONFIG_KEYS))}")
            item = next(f for f in fields(cls) if f.name == name)
            try:
                _check_type(name, item.type, value)
            except BadInput as exc:
                raise BadInput(f"{path}: {key}: {exc}") from None
            settings[name] = value
        try:
            return cls(**{**settings, **overrides})
        except BadInput as exc:
            raise BadInput(f"{exc} (settings from {path} and the command line)") from None


ALIASES = {"weight-decay": "adam_weight_decay", "init": "initializer"}  # option name -> field, where they differ


def _flag(name: str) -> str:
    reverse = {field: option for option, field in ALIASES.items()}
    return "--" + reverse.get(name, name.replace("_", "-"))


def _config_keys() -> dict[str, str]:
    keys = {f.name.replace("_", "-"): f.name for f in fields(TrainConfig)}
    keys.update(ALIASES)
    return keys


def config_key(key) -> str | None:
    """The TrainConfig field a config-file key names (option names, '-' or '_'), or None."""
    text = str(key).strip().removeprefix("--").replace("_", "-")
    return CONFIG_KEYS.get(text)


def _check_type(name: str, kind: str, value) -> None:
    """``value`` fits the field's declared type (``int``, ``float``, ``bool``, ``str``, ``X | None``)."""
    if value is None and kind.endswith("| None"):
        return
    base = kind.replace("| None", "").strip()
    whole = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "int": whole,
        "float": whole or (isinstance(value, float) and math.isfinite(value)),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[base]
    if not ok:
        expected = {"int": "a whole number", "float": "a finite number", "bool": "true or false",
                    "str": "text"}[base]
        raise BadInput(f"{_flag(name)} must be {expected}, got {value!r}")


def _check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and (value >= high if high_open else value > high))
    if bad:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
        raise BadInput(f"{_flag(name)} must be a finite number in {span}, got {value}")


CONFIG_KEYS = _config_keys()
