"""Settings from the environment and the registry's config file, read in one place, once.

:class:`Settings` is what the library takes where the environment would otherwise be consulted
deep inside it: the registry root (``STC_HOME``), the default base model (``STC_MODEL``, else
``model:`` in ``$STC_HOME/config.yaml``), whether to stay offline (``HF_HUB_OFFLINE``), the CPU
threads (``STC_THREADS``), what the base model predicts (``STC_PREDICTION_TYPE``) and the
process rank of a multi-process run (``RANK``). The CLI builds one from its flags on top of the
environment and passes it down; a Python caller passes its own, or gets the environment's.

Foundation of the library: nothing heavy is imported here (yaml and platformdirs only when
the config file or the platform's data folder is needed).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
RANDOM_SEED = -1  # --seed -1: draw one (the A1111 webui's "random")
DRAWN_SEED_LIMIT = 2**32  # drawn seeds lie in 0..2**32-1, as the webui draws them (short to retype)
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONFIG_FILE = "config.yaml"  # in the registry root: settings of this registry (today: model)
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """What the environment says, checked. ``None`` fields: not set (the library's default)."""

    home: Path  # the registry root
    model: str | None = None  # STC_MODEL; None: config.yaml's model, else DEFAULT_MODEL
    offline: bool = False  # use only what is on disk, never touch the network
    threads: int | None = None  # torch CPU threads; None: stc chooses per model
    prediction_type: str | None = None  # None: the model's own scheduler config
    process_rank: int = 0  # 0 under a single process; torchrun/accelerate set RANK

    @classmethod
    def from_environment(cls, **given) -> "Settings":
        """The environment's settings, with ``given`` (flags: ``threads=``, ``offline=``, …; None
        leaves the environment's) on top. Bad values are one-line errors here, before any work."""
        environ = os.environ
        settings = cls(
            home=registry_root(),
            model=environ.get("STC_MODEL", "").strip() or None,
            offline=environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
            threads=requested_threads(),
            prediction_type=check_prediction_type(environ.get("STC_PREDICTION_TYPE", "").strip() or None,
                                                  "STC_PREDICTION_TYPE"),
            process_rank=_rank(environ.get("RANK")),
        )
        return settings.replace(**given)

    def replace(self, **given) -> "Settings":
        """These settings with the ``given`` ones that are not None, checked."""
        given = {key: value for key, value in given.items() if value is not None}
        if "threads" in given:
            given["threads"] = requested_threads(given["threads"])
        if "prediction_type" in given:
            given["prediction_type"] = check_prediction_type(given["prediction_type"])
        if "home" in given:
            given["home"] = Path(given["home"]).expanduser()
        return dataclasses.replace(self, **given) if given else self

    @property
    def is_main_process(self) -> bool:
        """Only the main process of a multi-process run writes and talks."""
        return self.process_rank == 0

    def default_model(self) -> str:
        """The base model when none is given: ``STC_MODEL``, else ``model:`` in the registry's
        ``config.yaml``, else the SD 1.5 hub id."""
        if self.model:
            return self.model
        path = self.home / CONFIG_FILE
        model = _read_config(path).get("model")
        if model in (None, ""):
            return DEFAULT_MODEL
        if not isinstance(model, str):
            raise BadInput(f"{path}: 'model' must be a model name or path, not {model!r}")
        return model


def lora_folder(settings: "Settings") -> Path | None:
    """The folder ``<lora:NAME>`` tags are looked up in: ``loras:`` in the registry's ``config.yaml``
    (relative to it), else None."""
    path = settings.home / CONFIG_FILE
    folder = _read_config(path).get("loras")
    if folder in (None, ""):
        return None
    if not isinstance(folder, str):
        raise BadInput(f"{path}: 'loras' must be a folder of LoRA files, not {folder!r}")
    return (path.parent / Path(folder).expanduser()).resolve()


def draw_seed(seed: int) -> int:
    """``seed`` itself, or a seed drawn from the OS's randomness for :data:`RANDOM_SEED` (-1)."""
    if seed != RANDOM_SEED:
        return seed
    import secrets

    return secrets.randbelow(DRAWN_SEED_LIMIT)


def registry_root() -> Path:
    """``$STC_HOME`` if set, else the platform's user data folder for stc."""
    env = os.environ.get("STC_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("stc"))


def requested_threads(value: int | str | None = None) -> int | None:
    """``value`` (from ``--threads``) or ``STC_THREADS``; None when neither says."""
    raw = value if value is not None else os.environ.get("STC_THREADS")
    if raw in (None, ""):
        return None
    try:
        threads = int(raw)
    except (TypeError, ValueError):
        raise BadInput(f"threads (--threads / STC_THREADS) must be a whole number, not {raw!r}") from None
    if threads < 1:
        raise BadInput(f"threads (--threads / STC_THREADS) must be at least 1, got {threads}")
    return threads


def check_prediction_type(value: str | None, flag: str = "--prediction-type") -> str | None:
    if value is not None and value not in PREDICTION_TYPES:
        raise BadInput(f"{flag} must be one of {', '.join(PREDICTION_TYPES)}, not {value!r}")
    return value


def _rank(value: str | None) -> int:
    try:
        return int(value) if value not in (None, "") else 0
    except ValueError:
        raise BadInput(f"RANK must be a whole number (set by torchrun or accelerate), not {value!r}") from None


def _read_config(path: Path) -> dict:
    """The registry's ``config.yaml`` (``{}`` when there is none); a malformed one is an error."""
    if not path.is_file():
        return {}
    import yaml

    from .safe_yaml import yaml_load

    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        from .errors import one_line

        raise BadInput(f"cannot read {path} (it must be YAML, e.g. 'model: builtin:shapes'): {one_line(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInput(f"{path} must hold a mapping of setting: value (e.g. 'model: builtin:shapes')")
    return data
