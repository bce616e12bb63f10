"""Training settings: the hyper-parameters of a run, their defaults and their checks.

Defaults are the reference implementation's (``docs/method.md``). Every ``stc train`` option
and every key of a ``--config`` file is a field here; the command line defines no defaults of
its own. Torch-free: the registry reads these records without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import BadInput

OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
DEFAULT_INITIALIZER = {"object": "object", "style": "painting"}
COMMON_INITIALIZERS = [
    "object", "animal", "pet", "dog", "cat", "bird", "person", "man", "woman", "face", "toy", "doll",
    "car", "house", "building", "flower", "plant", "tree", "cup", "mug", "bag", "shoe", "hat",
    "sculpture", "statue", "painting", "drawing", "style", "art", "pattern", "texture", "food",
]
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
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for flag, value in positive.items():
            if value < 1:
                raise BadInput(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        if self.lr <= 0:
            raise BadInput(f"--lr must be positive, got {self.lr}")
        if self.kind not in DEFAULT_INITIALIZER:
            raise BadInput(f"--kind must be 'object' or 'style', not {self.kind!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise BadInput(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        for flag in ("save_every", "preview_every"):
            if getattr(self, flag) < 0:
                raise BadInput(f"--{flag.replace('_', '-')} must be 0 (off) or positive")
        if not 0.0 <= self.nested_dropout_prob <= 1.0:
            raise BadInput("--nested-dropout-prob must lie between 0 and 1")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise BadInput(f"--resolution must be a positive multiple of 8, got {self.resolution}")

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
    def from_file(cls, path: Path, overrides: dict) -> "TrainConfig":
        """Settings from a YAML file, then ``overrides`` (explicit flags) on top."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read the config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise BadInput(f"{path} must hold a mapping of option: value")
        data = {str(key).replace("-", "_"): value for key, value in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(
                f"unknown setting(s) in {path}: {', '.join(unknown)}. Known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**{**data, **overrides})
        except TypeError as exc:
            raise BadInput(f"bad settings in {path}: {exc}") from exc
