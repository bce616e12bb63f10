"""Resolving a base model: ``builtin:tiny``, a local diffusers folder, a single file, a hub id."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ModelError

TINY = "builtin:tiny"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class BaseModel:
    """A loaded pipeline plus what stc needs to know about it."""

    spec: str  # what the concept records: builtin:tiny, a hub id, or an absolute path
    pipeline: object  # diffusers.StableDiffusionPipeline
    device: str
    dtype: object  # torch.dtype of the frozen models

    @property
    def text_width(self) -> int:
        return int(self.pipeline.text_encoder.config.hidden_size)

    @property
    def default_resolution(self) -> int:
        unet = self.pipeline.unet
        return int(unet.config.sample_size) * self.pipeline.vae_scale_factor


def embedding_fingerprint(pipeline) -> str:
    """A short fingerprint of the text encoder's token-embedding table (its first 4096 rows in
    fp16): equal for the same base model in any precision, different for most fine-tunes."""
    import hashlib

    import torch

    table = pipeline.text_encoder.get_input_embeddings().weight[:4096]
    data = table.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def default_model() -> str:
    """The base model when none is given: ``STC_MODEL``, else ``model:`` in ``$STC_HOME/config.yaml``,
    else the SD 1.5 hub id."""
    env = os.environ.get("STC_MODEL", "").strip()
    if env:
        return env
    from .registry import registry_root
    from .storage import yaml_load

    path = registry_root() / "config.yaml"
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {' '.join(str(exc).split())}") from exc
    if isinstance(data, dict) and data.get("model"):
        if not isinstance(data["model"], str):
            raise ModelError(f"{path}: 'model' must be a model name or path, not {data['model']!r}")
        return data["model"]
    return DEFAULT_MODEL


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torch_dtype(name: str | None, device: str):
    """fp32/fp16/bf16 to a torch dtype; None picks fp16 on GPUs and fp32 on the CPU."""
    import torch

    if name is None:
        name = "fp32" if device == "cpu" else "fp16"
    if name not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if device == "cpu" and name == "fp16":
        raise ModelError("--dtype fp16 is not supported on the CPU; use fp32 or bf16")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps was asked for, but MPS is not available; use --device cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or mps")


@lru_cache(maxsize=1)
def _tiny_pipeline():
    from .tiny import build_tiny_pipeline

    return build_tiny_pipeline()


def canonical_spec(spec: str) -> str:
    """What a concept records for ``spec``: local paths become absolute."""
    if spec == TINY or spec.startswith("builtin:"):
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    return spec


def _load_folder(path: Path, dtype):
    from diffusers import StableDiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder saved "
            "with save_pretrained, a .safetensors file with --model-config, or a hub id"
        )
    try:
        return StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the pipeline in {path}: {exc}") from exc


def _load_single_file(path: Path, config: str | None, dtype):
    from diffusers import StableDiffusionPipeline

    if path.suffix != ".safetensors":
        raise ModelError(
            f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt files can run code); "
            "convert it to .safetensors first"
        )
    if config is None:
        raise ModelError(
            f"{path.name} is a single-file checkpoint: pass --model-config DIR, a local diffusers folder "
            "of the same architecture (its configs and tokenizer are used; nothing is downloaded)"
        )
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(Path(config).expanduser()), local_files_only=True, torch_dtype=dtype,
            safety_checker=None, requires_safety_checker=False,
        )
    except Exception as exc:  # diffusers raises many kinds here
        raise ModelError(f"could not load {path.name} with the config in {config}: {exc}") from exc


def _load_hub(model_id: str, dtype):
    """A hub id from the local cache, or downloaded (with progress) unless offline. Offline, no
    network request is made at all."""
    from diffusers import StableDiffusionPipeline

    offline = is_offline()
    try:
        return StableDiffusionPipeline.from_pretrained(
            model_id, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=offline,
        )
    except Exception as exc:  # network, auth, missing files: all mean the same to the user
        hint = ("it is not in the local Hugging Face cache and stc is offline (--offline or HF_HUB_OFFLINE)"
                if offline else " ".join(str(exc).split())[:300])
        raise ModelError(
            f"could not load model {model_id!r}: {hint}. Download it first (hf download {model_id}), pass a "
            f"local folder or .safetensors file, or use --model {TINY}"
        ) from exc


def text_width_of(spec: str, model_config: str | None = None) -> int | None:
    """The text encoder width of a base model from its config alone (no weights load, no
    network); None when it cannot be known offline."""
    import json

    if spec == TINY:
        from .tiny import TINY_TEXT_WIDTH

        return TINY_TEXT_WIDTH
    path = Path(spec).expanduser()
    folder = path if path.is_dir() else Path(model_config).expanduser() if model_config else None
    candidates = [folder / "text_encoder" / "config.json"] if folder else []
    if not candidates and spec.count("/") == 1 and not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "text_encoder/config.json")
            candidates = [Path(cached)] if isinstance(cached, str) else []
        except Exception:  # no cache, no hub library: unknown
            candidates = []
    for candidate in candidates:
        try:
            return int(json.loads(candidate.read_text(encoding="utf-8"))["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def load_base_model(
    spec: str, device: str | None = None, dtype: str | None = None, config: str | None = None
) -> BaseModel:
    """Load the pipeline named by ``spec`` onto ``device`` with frozen weights in ``dtype``."""
    device = device or default_device()
    check_device(device)
    weight_dtype = torch_dtype(dtype, device)
    if spec == TINY:
        pipeline = copy.deepcopy(_tiny_pipeline())
    elif spec.startswith("builtin:"):
        raise ModelError(f"unknown builtin model {spec!r}; the only one is {TINY}")
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipeline = _load_folder(path, weight_dtype)
        elif path.is_file():
            pipeline = _load_single_file(path, config, weight_dtype)
        elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            pipeline = _load_hub(spec, weight_dtype)
        else:
            raise ModelError(f"model {spec!r} is neither a local folder, a file, a hub id nor {TINY}")
    for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
        module.to(device)
        if module.dtype != weight_dtype:
            module.to(dtype=weight_dtype)
        module.eval().requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    if device == "cpu":
        from .threads import apply_threads

        apply_threads(sum(p.numel() for p in pipeline.unet.parameters()))
    return BaseModel(spec=canonical_spec(spec), pipeline=pipeline, device=device, dtype=weight_dtype)
