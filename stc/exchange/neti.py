"""The reference NeTI implementation's checkpoint pair: read (``stc import``) and written
(``stc export --format neti``).

The reference implementation (NeuralTextualInversion/NeTI) saves a concept as two
``torch.save`` pickles:

- ``<name>-mapper.pt``: ``{"state_dict", "cfg", "encoder"}``. ``state_dict`` holds
  ``input_layer.*`` and the identical ``net.0.*`` (one layer registered twice), ``net.1/2/4/5.*``
  and ``output_layer.0.*``; a CPU run adds ``encoder.w``, a CUDA run does not. ``encoder`` is a
  pickled ``models.positional_encoding.NeTIPositionalEncoding`` holding the Fourier matrix ``w``
  (or a ``BasicEncoder`` when ``use_positional_encoding`` was off); ``cfg`` is
  ``pyrallis.encode(RunConfig)``, a plain dict.
- ``<name>-learned_embeds.bin``: ``{placeholder: tensor[768]}``.

Reading goes through :func:`stc.exchange.torchfiles.read_torch_file` with inert stand-ins for
the reference's two encoder classes; the mapper is then converted to stc's layout
(:func:`state_dict_from_reference`) and built through :func:`stc.store.conceptio.mapper_from_state`,
like every other mapper stc runs. Writing converts back (:func:`state_dict_for_reference`) and
pickles the encoder as a module of the reference's class name, without the reference's code.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput
from ..method.mapper import MapperConfig, NeTIMapper
from ..outputs import staged
from .common import ExportJob, ExportResult, Imported, ImportRequest, base_model_for, concept_name, new_concept
from .torchfiles import BadCheckpoint, portable_torch_save, read_torch_file

# The reference's ModelConfig defaults (training/config.py), for checkpoints whose cfg is partial.
REFERENCE_MODEL_DEFAULTS: dict[str, Any] = {
    "use_nested_dropout": True,
    "nested_dropout_prob": 0.5,
    "target_norm": None,
    "use_positional_encoding": True,
    "pe_sigmas": {"sigma_t": 0.03, "sigma_l": 2.0},
    "num_pe_time_anchors": 10,
    "output_bypass": True,
}


REFERENCE_TEXT_WIDTH = 768  # the reference implementation hard-codes SD 1.x's text width

INPUT_LAYER_KEYS = ("input_layer.weight", "input_layer.bias", "net.0.weight", "net.0.bias")

MAPPER_KEYS = tuple(f"{layer}.{param}" for layer in ("net.1", "net.2", "net.4", "net.5", "output_layer.0")
                    for param in ("weight", "bias"))


ENCODER_W_KEY = "encoder.w"


class UnsupportedReference(BadInput):
    """A well-formed reference checkpoint trained with an option stc's mapper does not have."""


# --------------------------------------------------------------------------- reading


class PickledModule:
    """An inert stand-in for a pickled reference ``nn.Module``: it records its state, nothing else."""

    kind = "module"

    def __setstate__(self, state: Any) -> None:
        self.state = state


class PickledPositionalEncoding(PickledModule):
    """Stands in for ``models.positional_encoding.NeTIPositionalEncoding``."""

    kind = "positional"


class PickledBasicEncoder(PickledModule):
    """Stands in for ``models.positional_encoding.BasicEncoder``."""

    kind = "basic"


REFERENCE_CLASSES = {
    ("models.positional_encoding", "NeTIPositionalEncoding"): PickledPositionalEncoding,
    ("models.positional_encoding", "BasicEncoder"): PickledBasicEncoder,
}


@dataclass
class ReferenceCheckpoint:
    """A reference ``<name>-mapper.pt``, read and checked but not yet converted.

    ``encoder``: ``kind`` ("positional" or "basic"), ``w`` (the Fourier matrix, or None),
    ``sigma_t``, ``sigma_l``, ``num_w`` (None where the pickle lacks them).
    """

    state_dict: dict[str, torch.Tensor]
    cfg: dict
    encoder: dict
    path: Path

    @property
    def placeholder_token(self) -> str | None:
        return self._data_field("placeholder_token")

    @property
    def super_category_token(self) -> str | None:
        return self._data_field("super_category_token")

    def _data_field(self, name: str) -> str | None:
        data = self.cfg.get("data")
        value = data.get(name) if isinstance(data, dict) else None
        return value if isinstance(value, str) else None


def _tensor_dict(value: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not value:
        raise BadCheckpoint(f"{path}: {what} is a {type(value).__name__}, not a dict of tensors")
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise BadCheckpoint(f"{path}: {what} has an entry {str(key)[:60]!r} that is not a named tensor")
    return dict(value)


def _encoder_fields(encoder: Any, path: Path) -> dict:
    if not isinstance(encoder, PickledModule):
        raise BadCheckpoint(f"{path}: 'encoder' is a {type(encoder).__name__}, not the reference's "
                            "NeTIPositionalEncoding")
    state = getattr(encoder, "state", None)
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{path}: the pickled {type(encoder).__name__} has no attribute state")
    fields = {"kind": encoder.kind, "w": None, "sigma_t": state.get("sigma_t"), "sigma_l": state.get("sigma_l"),
              "num_w": state.get("num_w")}
    for holder in (state, state.get("_parameters") or {}, state.get("_buffers") or {}):
        if isinstance(holder, dict) and holder.get("w") is not None:
            fields["w"] = holder["w"]
            break
    w = fields["w"]
    if w is not None and not (isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == 2):
        raise BadCheckpoint(f"{path}: the encoder's w is not an N x 2 matrix")
    return fields


def _check_keys(state_dict: dict, kind: str, path: Path) -> None:
    required = MAPPER_KEYS + (INPUT_LAYER_KEYS if kind == "positional" else ())
    missing = [key for key in required if key not in state_dict]
    unexpected = sorted(set(state_dict) - set(required) - {ENCODER_W_KEY})
    if missing or unexpected:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unexpected {', '.join(unexpected[:8])}"] if unexpected else [])
        raise BadCheckpoint(f"{path} is not a reference NeTI mapper: its state_dict {' and '.join(problems)}")


def read_reference_mapper(path: str | Path) -> ReferenceCheckpoint:
    """Read a reference ``<name>-mapper.pt`` (restricted unpickler) and check its structure."""
    path = Path(path)
    content = read_torch_file(path, REFERENCE_CLASSES)
    if not isinstance(content, dict):
        raise BadCheckpoint(f"{path} holds a {type(content).__name__}, not the reference's "
                            "{state_dict, cfg, encoder} dict")
    missing = [key for key in ("state_dict", "cfg", "encoder") if key not in content]
    if missing:
        raise BadCheckpoint(f"{path} is not a reference NeTI mapper: it lacks {', '.join(missing)}")
    if not isinstance(content["cfg"], dict):
        raise BadCheckpoint(f"{path}: cfg is a {type(content['cfg']).__name__}, not a dict")
    encoder = _encoder_fields(content["encoder"], path)
    state_dict = _tensor_dict(content["state_dict"], "state_dict", path)
    _check_keys(state_dict, encoder["kind"], path)
    return ReferenceCheckpoint(state_dict=state_dict, cfg=content["cfg"], encoder=encoder, path=path)


def read_learned_embeds(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a reference ``<name>-learned_embeds.bin``: ``{placeholder: embedding}``."""
    path = Path(path)
    return _tensor_dict(read_torch_file(path, REFERENCE_CLASSES), "the learned embeddings file", path)


def _model_cfg(ckpt: ReferenceCheckpoint) -> dict:
    model = ckpt.cfg.get("model", {})
    if not isinstance(model, dict):
        raise BadCheckpoint(f"{ckpt.path}: cfg['model'] is not a dict")
    return {**REFERENCE_MODEL_DEFAULTS, **model}


def _sigmas(ckpt: ReferenceCheckpoint, model: dict) -> tuple[float, float]:
    """The sigmas ``w`` was drawn with: the pickled encoder's, else the cfg's ``pe_sigmas``."""
    if ckpt.encoder["sigma_t"] is not None and ckpt.encoder["sigma_l"] is not None:
        return float(ckpt.encoder["sigma_t"]), float(ckpt.encoder["sigma_l"])
    sigmas = model["pe_sigmas"]
    if isinstance(sigmas, Mapping):
        return float(sigmas["sigma_t"]), float(sigmas["sigma_l"])
    sigma_t, sigma_l = sigmas
    return float(sigma_t), float(sigma_l)


def _refuse_basic_encoder(ckpt: ReferenceCheckpoint) -> None:
    if ckpt.encoder["kind"] == "basic" or _model_cfg(ckpt)["use_positional_encoding"] is False:
        raise UnsupportedReference(
            f"{ckpt.path} was trained with use_positional_encoding off (its encoder is a BasicEncoder); "
            "stc's mapper always uses the Fourier positional encoding, so it cannot import this concept"
        )


def reference_mapper_config(ckpt: ReferenceCheckpoint) -> MapperConfig:
    """The :class:`~stc.method.mapper.MapperConfig` that reproduces ``ckpt``'s reference mapper."""
    _refuse_basic_encoder(ckpt)
    model = _model_cfg(ckpt)
    if model["target_norm"] is None:
        raise UnsupportedReference(
            f"{ckpt.path} was trained without output normalisation (cfg model.target_norm is None); "
            "stc's mapper always scales its output to the initializer word's norm"
        )
    sd = ckpt.state_dict
    out_rows = sd["output_layer.0.weight"].shape[0]
    num_anchors, in_cols = sd["net.0.weight"].shape
    try:
        bypass, time_anchors = bool(model["output_bypass"]), int(model["num_pe_time_anchors"])
        num_w = int(ckpt.encoder["num_w"] or in_cols // 2)
        if (bypass and out_rows % 2) or in_cols != 2 * num_w or num_anchors % time_anchors:
            raise ValueError(f"output {out_rows} rows (bypass {bypass}), input {num_anchors} x {in_cols} "
                             f"for {num_w} Fourier features and {time_anchors} time anchors")
        sigma_t, sigma_l = _sigmas(ckpt, model)
        return MapperConfig(
            text_width=out_rows // 2 if bypass else out_rows, norm_scale=float(model["target_norm"]),
            num_layers=num_anchors // time_anchors, num_time_anchors=time_anchors, num_fourier_features=num_w,
            sigma_t=sigma_t, sigma_l=sigma_l, hidden_dim=sd["net.1.weight"].shape[0], bypass=bypass,
            nested_dropout=bool(model["use_nested_dropout"]),
            nested_dropout_prob=float(model["nested_dropout_prob"]),
        )
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as exc:
        raise BadCheckpoint(f"{ckpt.path}: its cfg does not fit its weights: {exc}") from exc


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def state_dict_from_reference(ckpt: ReferenceCheckpoint) -> dict[str, torch.Tensor]:
    """``ckpt``'s weights under stc's names: the duplicate ``input_layer.*`` dropped after checking
    it is ``net.0.*``, and ``encoding.w`` from the pickled encoder (cross-checked with
    ``encoder.w`` where the state_dict has it)."""
    _refuse_basic_encoder(ckpt)
    sd, path = ckpt.state_dict, ckpt.path
    for param in ("weight", "bias"):
        if not _same(sd[f"input_layer.{param}"], sd[f"net.0.{param}"]):
            raise BadCheckpoint(f"{path}: input_layer.{param} differs from net.0.{param}; the reference "
                                "registers one layer under both names, so the file is inconsistent")
    w, saved_w = ckpt.encoder["w"], sd.get(ENCODER_W_KEY)
    if w is None and saved_w is None:
        raise BadCheckpoint(f"{path} has no Fourier matrix w (neither in its encoder nor as {ENCODER_W_KEY})")
    if w is not None and saved_w is not None and not _same(w, saved_w):
        raise BadCheckpoint(f"{path}: the pickled encoder's w differs from state_dict['{ENCODER_W_KEY}']")
    state = {key: value for key, value in sd.items()
             if not key.startswith("input_layer.") and key != ENCODER_W_KEY}
    state["encoding.w"] = w if w is not None else saved_w
    return state


def mapper_from_reference(ckpt: ReferenceCheckpoint) -> NeTIMapper:
    """A :class:`~stc.method.mapper.NeTIMapper` (eval, fp32, CPU) with ``ckpt``'s weights, built through
    :func:`stc.store.conceptio.mapper_from_state`. ``mapper(t, l, rank=r)`` is the reference's
    ``mapper(t, l, truncation_idx=r)`` (rank 128 or None: no truncation; like the reference, a
    mapper trained without nested dropout ignores the rank)."""
    from ..store.conceptio import mapper_from_state

    config = reference_mapper_config(ckpt)
    return mapper_from_state(config, state_dict_from_reference(ckpt), source=str(ckpt.path))


def read(request: ImportRequest) -> Imported:
    """``stc import`` of a reference ``*-mapper.pt``."""
    path = request.path
    checkpoint = read_reference_mapper(path)
    mapper = mapper_from_reference(checkpoint)
    model_cfg = checkpoint.cfg.get("model") if isinstance(checkpoint.cfg.get("model"), dict) else {}
    recorded = model_cfg.get("pretrained_model_name_or_path")
    base = base_model_for(request, mapper.config.text_width, recorded if isinstance(recorded, str) else None)
    optim = checkpoint.cfg.get("optim") if isinstance(checkpoint.cfg.get("optim"), dict) else {}
    steps = optim.get("max_train_steps")
    concept = new_concept(
        concept_name(request.name, checkpoint.placeholder_token or path.name.removesuffix("-mapper.pt")), base,
        request.init or checkpoint.super_category_token or "object", mapper, path, "neti",
        steps=steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
    )
    return Imported(concept, mapper, "neti")


# --------------------------------------------------------------------------- writing


def state_dict_for_reference(state_dict: dict) -> dict:
    """stc's mapper weights in the reference model's layout: ``input_layer.*`` and the identical
    ``net.0.*`` (one module registered twice), no ``encoder.w`` (a CUDA-written checkpoint has none)."""
    converted = {key: value.detach().float().cpu() for key, value in state_dict.items() if key != "encoding.w"}
    converted["input_layer.weight"] = converted["net.0.weight"]  # the same tensor, as in the reference
    converted["input_layer.bias"] = converted["net.0.bias"]
    order = ["input_layer.weight", "input_layer.bias"] + [key for key in converted if not key.startswith("input_layer")]
    return {key: converted[key] for key in order}


def reference_cfg(concept) -> dict:
    """``pyrallis.encode(RunConfig)`` of the reference for ``concept``: a plain dict."""
    mapper, record = concept.mapper, concept.training
    from ..train.config import TrainConfig

    config = TrainConfig.of(record)
    return {
        "log": {"exp_name": concept.name, "exp_dir": "outputs", "save_steps": 250, "logging_dir": "logs",
                "report_to": "tensorboard", "checkpoints_total_limit": None},
        "data": {"train_data_dir": record.photos_dir or "photos", "placeholder_token": concept.token,
                 "super_category_token": concept.initializer, "dataloader_num_workers": 8,
                 "learnable_property": config.kind if config else "object", "repeats": 100,
                 "resolution": record.resolution or 512, "center_crop": False},
        "model": {"pretrained_model_name_or_path": concept.base_model,
                  "use_nested_dropout": bool(mapper.get("nested_dropout", True)),
                  "nested_dropout_prob": float(mapper.get("nested_dropout_prob", 0.5)),
                  "normalize_mapper_output": True, "target_norm": float(mapper["norm_scale"]),
                  "use_positional_encoding": True,
                  "pe_sigmas": {"sigma_t": float(mapper.get("sigma_t", 0.03)),
                                "sigma_l": float(mapper.get("sigma_l", 2.0))},
                  "num_pe_time_anchors": int(mapper.get("num_time_anchors", 10)),
                  "output_bypass": bool(mapper.get("bypass", True)), "revision": None, "mapper_checkpoint_path": None},
        "eval": {"validation_prompts": ["A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                                        "A painting of {} in the style of Monet"],
                 "num_validation_images": 4, "validation_seeds": [42, 420, 501, 5456], "validation_steps": 100,
                 "num_denoising_steps": 50},
        "optim": {"max_train_steps": concept.steps_done or 1000,
                  "learning_rate": config.lr if config else 1e-3, "scale_lr": config.scale_lr if config else True,
                  "train_batch_size": config.batch_size if config else 2, "gradient_checkpointing": False,
                  "gradient_accumulation_steps": config.grad_accum if config else 4,
                  "seed": config.seed if config else None, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "adam_beta1": config.adam_beta1 if config else 0.9,
                  "adam_beta2": config.adam_beta2 if config else 0.999,
                  "adam_weight_decay": config.adam_weight_decay if config else 1e-2,
                  "adam_epsilon": config.adam_epsilon if config else 1e-8,
                  "mixed_precision": config.mixed_precision if config else "no", "allow_tf32": False},
    }


def _positional_encoding_class():
    """A stand-in class that pickles as ``models.positional_encoding.NeTIPositionalEncoding``."""
    from torch import nn

    class NeTIPositionalEncoding(nn.Module):
        def __init__(self, w, sigma_t: float, sigma_l: float):
            super().__init__()
            self.sigma_t, self.sigma_l, self.num_w = sigma_t, sigma_l, int(w.shape[0])
            self.w = w  # a plain attribute, as the reference's CUDA runs leave it (not in state_dict)

    NeTIPositionalEncoding.__module__ = "models.positional_encoding"
    NeTIPositionalEncoding.__qualname__ = "NeTIPositionalEncoding"
    return NeTIPositionalEncoding


@contextlib.contextmanager
def _reference_modules(cls):
    """Make ``models.positional_encoding`` importable for the pickler while it writes, then remove it."""
    saved = {name: sys.modules.get(name) for name in ("models", "models.positional_encoding")}
    package, module = types.ModuleType("models"), types.ModuleType("models.positional_encoding")
    module.NeTIPositionalEncoding, package.positional_encoding = cls, module
    sys.modules.update({"models": package, "models.positional_encoding": module})
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def targets(name: str, out: Path, backbone) -> list[Path]:
    return [out / f"{name}-mapper.pt", out / f"{name}-learned_embeds.bin"]


def export(job: ExportJob, result: ExportResult) -> None:
    write_neti(job.concept, job.mapper, job.paths)  # the mapper alone: no base model needed


def write_neti(concept, mapper, paths: list[Path]) -> None:
    """The reference pair: ``<name>-mapper.pt`` and ``<name>-learned_embeds.bin``."""

    if concept.text_width != REFERENCE_TEXT_WIDTH:
        raise BadInput(
            f"the reference implementation supports text width {REFERENCE_TEXT_WIDTH} (SD 1.x) only; "
            f"{concept.name} has width {concept.text_width} ({concept.base_model})"
        )
    from .distill import mean_token

    state = mapper.state_dict()
    cls = _positional_encoding_class()
    encoder = cls(state["encoding.w"].detach().float().cpu().clone(), float(concept.mapper.get("sigma_t", 0.03)),
                  float(concept.mapper.get("sigma_l", 2.0)))
    checkpoint = {"state_dict": state_dict_for_reference(state), "cfg": reference_cfg(concept), "encoder": encoder}
    mapper_path, embeds_path = paths
    with staged(mapper_path) as temporary, _reference_modules(cls):
        temporary.write_bytes(portable_torch_save(checkpoint, mapper_path.stem))
    with staged(embeds_path) as temporary:
        temporary.write_bytes(portable_torch_save({concept.token: mean_token(mapper)}, embeds_path.stem))
