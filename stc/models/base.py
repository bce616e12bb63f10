"""Resolving a base model (``builtin:tiny``/``builtin:tiny-sd2``, a local diffusers folder, a single
file, a hub id), the device and the precision it runs in."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ModelError, one_line
from ..settings import Settings, check_prediction_type
from .backbones import LAYOUTS, backbone_of, backbone_of_hub_model, encoder_components
from .tiny import BUILTINS, SHAPES, SHAPES_SDXL, TINY, TINY_SD2, TINY_SDXL  # noqa: F401 (the builtins' names)

DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N


@dataclass
class BaseModel:
    """A loaded pipeline plus what stc needs to know about it."""

    spec: str  # what the concept records: builtin:tiny, a hub id, or an absolute path
    pipeline: object  # diffusers.StableDiffusionPipeline or StableDiffusionXLPipeline
    device: str
    dtype: object  # torch.dtype of the frozen models

    @property
    def backbone(self):
        """The model's family (stc/models/backbones): what stc asks about it."""
        return backbone_of(self.pipeline)

    @property
    def text_encoders(self) -> list:
        """The text encoder modules, in the order their states make up the UNet's context."""
        return self.backbone.encoder_modules(self.pipeline)

    @property
    def encoder_widths(self) -> list[int]:
        return [int(encoder.config.hidden_size) for encoder in self.text_encoders]

    @property
    def text_width(self) -> int:
        """The width of the UNet's text context: the text encoders' widths added up."""
        return sum(self.encoder_widths)

    @property
    def family_label(self) -> str:
        """How messages name this model's family: SD 1.x, SD 2.x, SDXL."""
        return self.backbone.label

    @property
    def default_resolution(self) -> int:
        unet = self.pipeline.unet
        return int(unet.config.sample_size) * self.pipeline.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" (SD 1.x, SD 2.x-base) or "v_prediction" (SD 2.x 768 px)."""
        return str(self.pipeline.scheduler.config.get("prediction_type", "epsilon"))


def embedding_fingerprint(pipeline) -> str:
    """A short fingerprint of the text encoder's token-embedding table (its first 4096 rows), the
    same for the same base model in any precision (fp32, bf16, fp16), different for most fine-tunes:
    the sha256 of the values' sign bits (rounding to any precision keeps a sign) and their root
    mean square (compared with a tolerance, ``same_embeddings``), as ``<16 hex>~<rms>``."""
    import hashlib

    import torch

    table = pipeline.text_encoder.get_input_embeddings().weight[:4096].detach().to("cpu")
    signs = torch.signbit(table).contiguous().numpy().tobytes()
    rms = table.double().square().mean().sqrt().item()  # fp64: rounding errors average out to ~1e-6
    return f"{hashlib.sha256(signs).hexdigest()[:16]}~{rms:.6g}"


RMS_TOLERANCE = 1e-3  # relative: rounding to bf16 moves the rms by ~1e-6, a 1% rescale by 1e-2


def same_embeddings(fingerprint: str, pipeline) -> bool | None:
    """Does ``pipeline``'s token-embedding table match a concept's recorded ``fingerprint``
    (None: cannot tell)? The older form (16 hex digits alone, a hash of the table in
    fp16) is only comparable to a table kept in fp32 or fp16."""
    import hashlib

    import torch

    if "~" not in fingerprint:  # the older form: the sha256 of the table in fp16
        table = pipeline.text_encoder.get_input_embeddings().weight[:4096].detach()
        if table.dtype not in (torch.float32, torch.float16):
            return None  # bf16 rounds other bits away than fp16 does
        data = table.to("cpu", torch.float16).contiguous().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16] == fingerprint
    signs, _, rms = fingerprint.partition("~")
    ours, _, our_rms = embedding_fingerprint(pipeline).partition("~")
    try:
        return signs == ours and abs(float(our_rms) - float(rms)) <= RMS_TOLERANCE * abs(float(rms))
    except ValueError:
        return None


def default_device() -> str:
    """What ``--device auto`` (the default) picks: CUDA, else MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_dtype(device: str) -> str:
    """The frozen models' precision when --dtype is not given: fp32 on the CPU (fp16 is not
    supported there), fp16 on GPUs (CUDA, MPS)."""
    return "fp32" if device.split(":")[0] == "cpu" else "fp16"


def torch_dtype(name: str | None, device: str):
    """fp32/fp16/bf16 to a torch dtype for ``device``; None picks :func:`default_dtype`.
    A precision the device cannot run is a clear error."""
    import torch

    if name is None:
        name = default_dtype(device)
    if name not in DTYPES:
        raise ModelError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, not {name!r}")
    kind = device.split(":")[0]
    if kind == "cpu" and name == "fp16":
        raise ModelError("fp16 (--dtype) is not supported on the CPU; use fp32 or bf16")
    if name == "bf16" and not bf16_supported(device):
        raise ModelError(f"bf16 (--dtype) is not supported on this {kind.upper()} device; use fp16 or fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def bf16_supported(device: str) -> bool:
    """bfloat16 runs on every CPU, on CUDA GPUs that have it (compute capability 8.0+) and on
    MPS where this macOS has it."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
        except (RuntimeError, TypeError):
            return False
        return True
    return kind == "cpu"


def check_device(device: str | None) -> str:
    """The one place devices are validated: ``device`` (auto/None, cpu, cuda, cuda:N, mps) as the
    concrete device to use; an unknown or unavailable one is a clear error."""
    import torch

    if device is None or device == "auto":
        return default_device()
    kind, _, index = device.partition(":")
    if kind not in DEVICES[1:] or (index and (kind != "cuda" or not index.isdigit())):
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device} (--device) was asked for, but no CUDA GPU is available; use the "
                             "CPU (--device cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise ModelError(
                f"device {device} (--device) was asked for, but there are only {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    if kind == "mps" and not _mps_available():
        raise ModelError("device mps (--device) was asked for, but MPS is not available; use --device cpu")
    return device


@lru_cache(maxsize=len(BUILTINS))
def _builtin_pipeline(spec: str):
    if spec in (SHAPES, SHAPES_SDXL):
        from ..worlds.shapes.model import build_shapes_pipeline, build_shapes_sdxl_pipeline

        return build_shapes_pipeline() if spec == SHAPES else build_shapes_sdxl_pipeline()
    from .tiny import build_tiny_pipeline, build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline

    return {TINY: build_tiny_pipeline, TINY_SD2: build_tiny_sd2_pipeline, TINY_SDXL: build_tiny_sdxl_pipeline}[spec]()


def pipeline_class(name: str | None, where: str):
    """The diffusers pipeline class of a model_index ``_class_name``; other pipelines are refused."""
    import diffusers

    if name not in [layout.pipeline_class for layout in LAYOUTS]:
        raise ModelError(
            f"{where} is a {name or 'pipeline of unknown class'}; stc trains and renders Stable Diffusion 1.x/2.x "
            "(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) models"
        )
    return getattr(diffusers, name)


def _pretrained_kwargs(cls) -> dict:
    """What from_pretrained gets besides the dtype: the layout's (SD 1.x/2.x pipelines load without
    their safety checker: stc renders for the user; diffusers' own default prints a warning)."""
    layout = next(layout for layout in LAYOUTS if layout.pipeline_class == cls.__name__)
    return dict(layout.pretrained_kwargs)


def canonical_spec(spec: str) -> str:
    """What a concept records for ``spec``: local paths become absolute."""
    if spec.startswith("builtin:"):
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    return spec


def _load_folder(path: Path, dtype):
    import json

    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder saved "
            "with save_pretrained, a .safetensors file with --model-config, or a hub id"
        )
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"cannot read {index}: {one_line(exc)}") from exc
    cls = pipeline_class(class_name, str(path))
    try:
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **_pretrained_kwargs(cls))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the pipeline in {path}: {exc}") from exc


def _load_single_file(path: Path, config: str | None, dtype, prediction_type: str | None = None):
    """A single-file (LDM-layout) checkpoint, offline: see stc/models/backbones/single_file.py."""
    from .backbones.single_file import load_single_file

    return load_single_file(path, config, dtype, prediction_type)


def _load_hub(model_id: str, dtype, offline: bool):
    """A hub id from the local cache, or downloaded (with progress) unless ``offline``. Offline, no
    network request is made at all."""
    from diffusers import DiffusionPipeline

    from .backbones.single_file import _hub_cache

    cache = _hub_cache()  # HF_HUB_CACHE / HF_HOME as they are now, not at import
    try:
        class_name = DiffusionPipeline.load_config(model_id, local_files_only=offline, cache_dir=cache).get(
            "_class_name")
        cls = pipeline_class(class_name, model_id)
        return cls.from_pretrained(model_id, torch_dtype=dtype, local_files_only=offline, cache_dir=cache,
                                   **_pretrained_kwargs(cls))
    except ModelError:
        raise
    except Exception as exc:  # network, auth, missing files: all mean the same to the user
        raise ModelError(
            f"could not load model {model_id!r}: {_hub_failure(exc, offline)}. Download it first (hf download "
            f"{model_id}), pass a local folder or .safetensors file, or try stc offline with --model {SHAPES} "
            "(a tiny trained world of coloured shapes)"
        ) from exc


def _hub_failure(exc: Exception, offline: bool) -> str:
    """Why a hub id did not load, in words (the libraries' messages run to paragraphs)."""
    text = " ".join(str(exc).split())
    if offline:
        return "it is not in the local Hugging Face cache and stc is offline (--offline or HF_HUB_OFFLINE)"
    if "not fully cached locally" in text or "Couldn't connect" in text or "fetch metadata from the Hub" in text:
        return "it is not in the local Hugging Face cache and the Hugging Face Hub could not be reached"
    if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError") or "404" in text:
        return "the Hugging Face Hub has no such model, or it is private or gated (log in: hf auth login)"
    return one_line(exc, 200)


def text_width_of(spec: str, model_config: str | None = None) -> int | None:
    """The width of a base model's text context (its text encoders' widths added up) from its
    config alone (no weights load, no network); None when it cannot be known offline."""
    widths = encoder_widths_of(spec, model_config)
    return sum(widths) if widths is not None else None


def encoder_widths_of(spec: str, model_config: str | None = None) -> tuple[int, ...] | None:
    """The width of each of a base model's text encoders from its config alone (no weights load,
    no network): a builtin's, a single file's header, a folder's (or ``model_config``'s) configs,
    a cached hub model's configs, a known family's hub model; None when it cannot be known offline."""
    import json

    if spec in BUILTINS:
        from ..worlds.shapes.model import SDXL_TEXT_WIDTHS
        from ..worlds.shapes.model import TEXT_WIDTH as SHAPES_TEXT_WIDTH
        from .tiny import TINY_SD2_TEXT_WIDTH, TINY_SDXL_TEXT_WIDTHS, TINY_TEXT_WIDTH

        return {TINY: (TINY_TEXT_WIDTH,), TINY_SD2: (TINY_SD2_TEXT_WIDTH,), TINY_SDXL: tuple(TINY_SDXL_TEXT_WIDTHS),
                SHAPES: (SHAPES_TEXT_WIDTH,), SHAPES_SDXL: tuple(SDXL_TEXT_WIDTHS)}[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        from .backbones.single_file import checkpoint_encoder_widths

        widths = checkpoint_encoder_widths(path)
        if widths is not None:
            return widths
    folder = path if path.is_dir() else Path(model_config).expanduser() if model_config else None
    components = encoder_components()
    if folder is not None:
        configs = [folder / name / "config.json" for name in components]
    elif spec.count("/") == 1 and not path.exists():
        configs = [_cached(spec, f"{name}/config.json") for name in components]
    else:
        configs = []
    widths = []
    for candidate in configs:  # the encoders a pipeline has come first: stop at the first one it lacks
        if candidate is None or not candidate.is_file():
            break
        try:
            widths.append(int(json.loads(candidate.read_text(encoding="utf-8"))["hidden_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if widths:
        return tuple(widths)
    family = backbone_of_hub_model(spec)
    return family.widths if family else None


def _cached(model_id: str, filename: str) -> Path | None:
    """A file of a hub model in the local Hugging Face cache, or None (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        from .backbones.single_file import _hub_cache

        cached = try_to_load_from_cache(model_id, filename, cache_dir=_hub_cache())
    except Exception:  # no cache, no hub library: unknown
        return None
    return Path(cached) if isinstance(cached, str) else None


def load_base_model(
    spec: str, device: str | None = None, dtype: str | None = None, config: str | None = None,
    prediction_type: str | None = None, env: Settings | None = None,
) -> BaseModel:
    """Load the pipeline named by ``spec`` onto ``device`` (None or "auto": the best available)
    with frozen weights in ``dtype`` (None: fp16 on GPUs, fp32 on the CPU).

    ``prediction_type`` ("epsilon" or "v_prediction"; default: ``env``'s, else the model's
    scheduler config) overrides what the model is taken to predict. ``env`` (default: the
    environment's settings) says whether to stay offline and how many CPU threads to use.
    """
    env = env or Settings.from_environment()
    device = check_device(device)
    weight_dtype = torch_dtype(dtype, device)
    prediction_type = check_prediction_type(prediction_type) or env.prediction_type
    if spec in BUILTINS:
        pipeline = copy.deepcopy(_builtin_pipeline(spec))
    elif spec.startswith("builtin:"):
        raise ModelError(f"unknown builtin model {spec!r}; the builtin ones are {', '.join(BUILTINS)}")
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipeline = _load_folder(path, weight_dtype)
        elif path.is_file():
            pipeline = _load_single_file(path, config, weight_dtype, prediction_type)
        elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            pipeline = _load_hub(spec, weight_dtype, env.offline)
        else:
            raise ModelError(f"model {spec!r} is neither a local folder, a file, a hub id nor a builtin "
                             f"({SHAPES}, {TINY}, …)")
    if prediction_type is not None and pipeline.scheduler.config.get("prediction_type") != prediction_type:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                                  prediction_type=prediction_type)
    backbone = backbone_of(pipeline)
    for module in (*backbone.encoder_modules(pipeline), pipeline.unet, pipeline.vae):
        module.to(device)
        wanted = backbone.vae_dtype(pipeline, weight_dtype) if module is pipeline.vae else weight_dtype
        if module.dtype != wanted:
            module.to(dtype=wanted)
        module.eval().requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    if device == "cpu":
        from .threads import apply_threads

        apply_threads(sum(p.numel() for p in pipeline.unet.parameters()), env.threads)
    return BaseModel(spec=canonical_spec(spec), pipeline=pipeline, device=device, dtype=weight_dtype)
