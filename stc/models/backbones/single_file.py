"""Single-file Stable Diffusion checkpoints (the original LDM layout, as A1111 and civitai ship
them; SDXL's original SGM layout): reading one offline into a diffusers pipeline, and the
inverse key mappings.

Reading never touches the network. The architecture comes from ``--model-config DIR`` (a local
diffusers folder of the same architecture, or just a CLIP tokenizer folder), else from the
configs stc ships for SD 1.x, SD 2.x and SDXL (``stc/models/configs/sd1``, ``sd2``, ``sdxl``: model
index, UNet, VAE, text encoder(s) and scheduler configs of stable-diffusion-v1-5,
stable-diffusion-2-1 and stable-diffusion-xl-base-1.0). The family is told by the text encoders in
the checkpoint: OpenAI CLIP ViT-L (768 wide, keys ``cond_stage_model.transformer.…``) is SD 1.x,
OpenCLIP ViT-H (1024 wide, keys ``cond_stage_model.model.…``) is SD 2.x; SDXL files have
``conditioner.embedders.0.transformer.…`` (CLIP ViT-L) and ``conditioner.embedders.1.model.…``
(OpenCLIP ViT-bigG, all 32 layers and its ``text_projection``), and the UNet's added embedding as
``label_emb.0.0``/``label_emb.0.2``. stc cannot ship a CLIP tokenizer vocabulary, so
without a tokenizer folder the tokenizer comes from the local Hugging Face cache (a model of
that family downloaded before), or loading stops with a one-line error saying what to pass.

UNet and VAE are converted by diffusers' own single-file code; the text encoder by
:func:`_text_encoder_state_dict` (the same key mapping as diffusers', with strict checking).
``.ckpt`` files are read with ``torch.load(weights_only=True)``: one that needs code to unpickle
is refused. ``_unet_to_ldm`` and ``_vae_to_ldm`` are the inverse mappings (diffusers → LDM keys): they name
what a file lacks, and the tests write real single files with them (``tests/ldm_writer.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...errors import ModelError, one_line
from ...settings import check_prediction_type
from . import BACKBONES, Backbone

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_PREFIXES = (VAE_PREFIX, "vae.")  # what diffusers' reader accepts
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP in transformers' layout
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP
CLIP_TOKEN_KEY = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
OPENCLIP_TOKEN_KEY = OPENCLIP_PREFIX + "token_embedding.weight"
# SDXL's original (SGM) layout: CLIP ViT-L in transformers' layout, OpenCLIP ViT-bigG with its projection
SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SGM_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SGM_CLIP_TOKEN_KEY = SGM_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
SGM_OPENCLIP_TOKEN_KEY = SGM_OPENCLIP_PREFIX + "token_embedding.weight"
SGM_PROJECTION_KEY = SGM_OPENCLIP_PREFIX + "text_projection"  # [width, projection]: transformers' weight transposed
CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
V_PREDICTION_KEY = "v_pred"  # a marker some v-prediction checkpoints carry (its value is unused)
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class CheckpointInfo:
    """What the keys and shapes of a single file say about its model."""

    encoder: str  # the text encoders' key layout, a backbone's checkpoint_layout: "clip", "openclip", "sgm"
    text_width: int  # the encoders' widths added up
    cross_attention_width: int | None
    v_prediction_marker: bool
    encoder_widths: tuple[int, ...] = ()  # each encoder's; () = one, text_width wide

    @property
    def widths(self) -> tuple[int, ...]:
        return self.encoder_widths or (self.text_width,)

    @property
    def family(self) -> Backbone | None:
        """The known family of this layout and these widths, or None."""
        return next((family for family in BACKBONES
                     if family.checkpoint_layout == self.encoder and family.widths == self.widths), None)

    @property
    def layout(self) -> Backbone:
        """The family, else the layout of its key layout at its widths (how it is loaded)."""
        family = self.family
        if family is not None:
            return family
        layout = next(backbone for backbone in BACKBONES if backbone.checkpoint_layout == self.encoder)
        return layout.with_widths(self.widths)

    def describe(self) -> str:
        family = self.family
        if family:
            return family.label
        if len(self.widths) > 1:
            return f"{self.layout.layout_label}-layout text encoders {'+'.join(map(str, self.widths))} wide"
        return f"a {self.text_width}-wide {self.encoder} text encoder"


# --------------------------------------------------------------------------- reading files


def read_checkpoint(path: Path) -> dict:
    """All tensors of a .safetensors or weights-only .ckpt file (a ``state_dict`` entry unwrapped)."""
    import torch

    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelError(
            f"{path.name}: single-file checkpoints must be .safetensors (or a weights-only .ckpt); "
            "for a diffusers model pass its folder"
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(
                f"{path.name} is not a readable .safetensors checkpoint ({one_line(exc)}); pass an SD 1.x/2.x/SDXL "
                "single file, with --model-config DIR for other architectures"
            ) from exc
    else:
        data = _read_pickled(path)
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    tensors = {key: value for key, value in data.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{path.name} holds no tensors; it is not a model checkpoint")
    return tensors


def _read_pickled(path: Path) -> dict:
    """A .ckpt read without running code: torch.load(weights_only=True) unpickles only tensors,
    containers and numbers; anything else (a class, a function) is refused before it runs."""
    import pickle

    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if needs is None:  # not a pickle torch can read at all
            raise ModelError(
                f"{path.name} is not a readable PyTorch checkpoint ({one_line(exc, 120)}); only .safetensors and "
                "weights-only .ckpt files are loaded"
            ) from exc
        raise ModelError(
            f"{path.name} pickles more than tensors (it names {needs[1]}): loading it would run code, so stc "
            "refuses it. Convert it to .safetensors where you trust it, or use the model's .safetensors release"
        ) from exc
    except Exception as exc:  # not a zip, truncated
        raise ModelError(
            f"{path.name} is not a readable PyTorch checkpoint ({one_line(exc, 120)}); only .safetensors and "
            "weights-only .ckpt files are loaded"
        ) from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} holds a {type(data).__name__}, not a state dict; it is not a model checkpoint")
    return data


def header_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of a .safetensors file from its header alone (nothing loads); None for
    other files or unreadable ones."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception:  # unreadable: the loader says why
        return None


def inspect_checkpoint(shapes: Mapping[str, tuple[int, ...]], name: str = "the checkpoint") -> CheckpointInfo:
    """The text encoder kind and width, the UNet's cross-attention width and the v-prediction
    marker; unsupported kinds (SDXL refiners, inpainting, UNet-only files) are clear errors."""
    keys = shapes.keys()
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise ModelError(f"{name} has no UNet ({UNET_PREFIX}…); it is not a Stable Diffusion 1.x/2.x/SDXL checkpoint")
    if not any(key.startswith(VAE_PREFIXES) for key in keys):
        raise ModelError(f"{name} has no VAE ({VAE_PREFIX}…); stc needs a full checkpoint (UNet, VAE, text encoder)")
    conv_in = shapes.get(CONV_IN_KEY)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(f"{name} is an inpainting or other {conv_in[1]}-channel UNet; stc needs a text-to-image model")
    cross = next((shape for key, shape in shapes.items() if key.startswith(UNET_PREFIX)
                  and key.endswith(".attn2.to_k.weight")), None)
    cross_width = int(cross[-1]) if cross is not None and len(cross) == 2 else None
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return _inspect_sgm(shapes, name, cross_width)
    if CLIP_TOKEN_KEY in shapes or any(key.startswith(CLIP_PREFIX) and key.endswith("token_embedding.weight")
                                       for key in keys):
        token_key = CLIP_TOKEN_KEY if CLIP_TOKEN_KEY in shapes else next(
            key for key in keys if key.startswith(CLIP_PREFIX) and key.endswith("token_embedding.weight"))
        encoder = "clip"
    elif OPENCLIP_TOKEN_KEY in shapes:
        token_key, encoder = OPENCLIP_TOKEN_KEY, "openclip"
    else:
        raise ModelError(f"{name} has no text encoder (cond_stage_model.…); stc needs a full checkpoint "
                         "(UNet, VAE, text encoder)")
    text_width = int(shapes[token_key][-1])
    if cross_width is not None and cross_width != text_width:
        raise ModelError(
            f"{name}: its UNet attends to {cross_width}-wide text but its text encoder is {text_width} wide"
        )
    return CheckpointInfo(encoder=encoder, text_width=text_width, cross_attention_width=cross_width,
                          v_prediction_marker=V_PREDICTION_KEY in shapes)


def _inspect_sgm(shapes, name: str, cross_width: int | None) -> CheckpointInfo:
    """An SDXL single file: CLIP ViT-L and OpenCLIP ViT-bigG (the base model; a refiner has only
    the second)."""
    if SGM_CLIP_TOKEN_KEY not in shapes:
        if SGM_OPENCLIP_TOKEN_KEY.replace("embedders.1", "embedders.0") in shapes:
            raise ModelError(f"{name} is an SDXL refiner (one OpenCLIP text encoder); stc trains and renders with the "
                             "SDXL base model")
        raise ModelError(f"{name} has SDXL conditioners but no CLIP text encoder ({SGM_CLIP_PREFIX}…); stc needs a "
                         "full SDXL base checkpoint")
    if SGM_OPENCLIP_TOKEN_KEY not in shapes:
        raise ModelError(f"{name} has SDXL conditioners but no OpenCLIP text encoder ({SGM_OPENCLIP_PREFIX}…); stc "
                         "needs a full SDXL base checkpoint")
    widths = (int(shapes[SGM_CLIP_TOKEN_KEY][-1]), int(shapes[SGM_OPENCLIP_TOKEN_KEY][-1]))
    if cross_width is not None and cross_width != sum(widths):
        raise ModelError(f"{name}: its UNet attends to {cross_width}-wide text but its text encoders are "
                         f"{'+'.join(map(str, widths))} wide")
    return CheckpointInfo(encoder="sgm", text_width=sum(widths), cross_attention_width=cross_width,
                          v_prediction_marker=V_PREDICTION_KEY in shapes, encoder_widths=widths)


def checkpoint_encoder_widths(path: Path) -> tuple[int, ...] | None:
    """The width of each text encoder of a .safetensors single file from its header; None when unknown."""
    shapes = header_shapes(path)
    if shapes is None:
        return None
    try:
        return inspect_checkpoint(shapes).widths
    except ModelError:
        return None


# --------------------------------------------------------------------------- loading


def load_single_file(path: Path, config: str | None, dtype, prediction_type: str | None = None):
    """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) from the single file ``path``,
    entirely from local files."""
    check_prediction_type(prediction_type)
    checkpoint = read_checkpoint(path)
    info = inspect_checkpoint({key: tuple(value.shape) for key, value in checkpoint.items()}, path.name)
    folder = Path(config).expanduser() if config else None
    if folder is not None and not folder.is_dir():
        raise ModelError(f"the model config folder {config} (--model-config) does not exist")
    if folder is not None and (folder / "model_index.json").is_file():
        config_dir, tokenizer = folder, None  # the folder's configs and tokenizer
        width = _config_text_width(folder)
        if width is not None and width != info.text_width:
            raise ModelError(
                f"{path.name} has a {info.text_width}-wide text encoder ({info.describe()}) but --model-config "
                f"{config} is for width {width}; pass a folder of the checkpoint's architecture"
            )
    else:
        family = info.family
        if family is None:
            raise ModelError(
                f"{path.name} has {info.describe()}, which is neither SD 1.x (768), SD 2.x (1024) nor SDXL "
                "(768+1280): pass --model-config DIR, a local diffusers folder of its architecture"
            )
        config_dir = family.config_dir
        tokenizer = _family_tokenizer(family, folder, path.name)
    return _pipeline_from_checkpoint(path, checkpoint, info, config_dir, tokenizer, dtype, prediction_type,
                                     shipped=config_dir != folder)


def _config_text_width(folder: Path) -> int | None:
    """The text context width of a diffusers folder's config: its text encoders' widths added up."""
    total = 0
    for name in ("text_encoder", "text_encoder_2"):
        path = folder / name / "config.json"
        if name == "text_encoder_2" and not path.is_file():
            break
        try:
            total += int(json.loads(path.read_text(encoding="utf-8"))["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def _family_tokenizer(family: Backbone, folder: Path | None, name: str):
    """The CLIP tokenizer for a checkpoint loaded with stc's configs: from ``folder`` (a
    tokenizer folder, or a folder with a tokenizer/ subfolder), else from the local cache."""
    if folder is not None:
        for candidate in (folder / "tokenizer", folder):
            if _has_tokenizer(candidate):
                return _load_tokenizer(candidate)
        raise ModelError(
            f"--model-config {folder} has neither model_index.json nor a tokenizer (vocab.json and merges.txt, "
            "or a tokenizer/ subfolder)"
        )
    from huggingface_hub import try_to_load_from_cache

    cache = _hub_cache()
    for repo, subfolder in family.tokenizer_sources:
        for filename in ("vocab.json", "tokenizer.json"):
            try:
                found = try_to_load_from_cache(repo, f"{subfolder}/{filename}" if subfolder else filename,
                                               cache_dir=cache)
            except Exception:  # a malformed cache entry: as if absent
                found = None
            if isinstance(found, str) and _has_tokenizer(Path(found).parent):
                return _load_tokenizer(Path(found).parent)  # (SDXL: its first tokenizer; the second is derived)
    raise ModelError(
        f"{name} is an {family.label} checkpoint: stc ships its configs but cannot ship the CLIP tokenizer, and none "
        f"is in the local Hugging Face cache. Pass --model-config DIR, a local {family.label} diffusers folder or "
        f"just its tokenizer folder (e.g. hf download {family.hub_model} --include 'tokenizer/*' --local-dir DIR)"
    )


def _has_tokenizer(folder: Path) -> bool:
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or (
        folder / "tokenizer.json").is_file()


def _load_tokenizer(folder: Path):
    """A CLIP tokenizer from a local folder that has its files (transformers would otherwise
    quietly build an empty one)."""
    from transformers import CLIPTokenizer

    if not _has_tokenizer(folder):
        raise ModelError(f"{folder} has no tokenizer (vocab.json and merges.txt)")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelError(f"could not load the tokenizer in {folder}: {one_line(exc)}") from exc


def _hub_cache() -> str:
    import os

    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return explicit
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _pipeline_from_checkpoint(path, checkpoint, info, config_dir: Path, tokenizer, dtype, prediction_type,
                              shipped: bool):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    where = f"the {info.describe()} configs stc ships" if shipped else f"the config in {config_dir}"
    try:
        unet = UNet2DConditionModel.from_single_file(
            checkpoint, config=str(config_dir), subfolder="unet", local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_single_file(
            checkpoint, config=str(config_dir), subfolder="vae", local_files_only=True, torch_dtype=dtype)
        layout = info.layout
        encoders = [_load_text_encoder(checkpoint, key_layout, config_dir, subfolder, dtype, path.name)
                    for key_layout, subfolder in layout.single_file_encoders]
        if tokenizer is None:
            tokenizer = _load_tokenizer(config_dir / "tokenizer")
        tokenizers = [tokenizer] + [_further_tokenizer(config_dir, reading.tokenizer, tokenizer)
                                    for reading in layout.readings[1:]]
        index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
        scheduler_class = getattr(diffusers, str((index.get("scheduler") or [None, "DDIMScheduler"])[1]),
                                  diffusers.DDIMScheduler)
        scheduler = scheduler_class.from_pretrained(str(config_dir), subfolder="scheduler", local_files_only=True)
    except ModelError:
        raise
    except Exception as exc:  # diffusers and transformers raise many kinds here
        _explain_missing(checkpoint, config_dir, where, path.name)
        raise ModelError(f"could not load {path.name} with {where}: {one_line(exc)}") from exc
    for module in (unet, vae):
        if any(value.device.type == "meta" for value in module.state_dict().values()):
            _explain_missing(checkpoint, config_dir, where, path.name)
            raise ModelError(f"{path.name} lacks {type(module).__name__} weights that {where} expect")
    if prediction_type is None and info.v_prediction_marker:
        prediction_type = "v_prediction"
    if prediction_type is not None and scheduler.config.get("prediction_type") != prediction_type:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    family = info.family
    if (shipped and family is not None and family.prediction_type == "v_prediction"
            and scheduler.config.prediction_type == "epsilon"):
        unet.register_to_config(sample_size=64)  # SD 2.x-base: 512 px epsilon; 2.x: 768 px v-prediction
    components = {"vae": vae, "unet": unet, "scheduler": scheduler}
    for reading, encoder, encoder_tokenizer in zip(layout.readings, encoders, tokenizers):
        components[reading.component], components[reading.tokenizer] = encoder, encoder_tokenizer
    return layout.assemble(components, index)


def _further_tokenizer(config_dir: Path, subfolder: str, tokenizer):
    """A second tokenizer (SDXL's ``tokenizer_2``): the folder's, else the first with ``!`` padding
    (SDXL's two tokenizers share vocabulary and merges; the second pads with ``!``)."""
    import copy

    if _has_tokenizer(config_dir / subfolder):
        return _load_tokenizer(config_dir / subfolder)
    second = copy.deepcopy(tokenizer)
    second.pad_token = "!"
    return second


def _explain_missing(checkpoint, config_dir: Path, where: str, name: str) -> None:
    """Raise a ModelError naming the UNet or VAE weights ``checkpoint`` lacks (or has in another
    shape) for the models of ``config_dir``; return when it has them all."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae_prefix = next((p for p in VAE_PREFIXES if any(key.startswith(p) for key in checkpoint)), VAE_PREFIX)
    for label, cls, to_ldm in (("UNet", UNet2DConditionModel, _unet_to_ldm), ("VAE", AutoencoderKL, _vae_to_ldm)):
        with init_empty_weights():
            module = cls.from_config(cls.load_config(str(config_dir), subfolder=label.lower()))
        expected = {key.replace(VAE_PREFIX, vae_prefix, 1): value.shape for key, value in to_ldm(module).items()}
        missing = [key for key in expected if key not in checkpoint]
        if missing:
            raise ModelError(
                f"{name} lacks {len(missing)} {label} weights that {where} expect (e.g. {missing[0]}); it is "
                "another architecture or a damaged file: pass --model-config DIR of its architecture"
            )
        squeeze = lambda shape: tuple(size for size in shape if size != 1)  # noqa: E731 (1x1 convs = linears)
        wrong = [key for key in expected if squeeze(checkpoint[key].shape) != squeeze(expected[key])]
        if wrong:
            raise ModelError(
                f"{name}: {label} weight {wrong[0]} is {tuple(checkpoint[wrong[0]].shape)}, {where} expect "
                f"{tuple(expected[wrong[0]])}; pass --model-config DIR of its architecture"
            )


def _load_text_encoder(checkpoint, encoder: str, config_dir: Path, subfolder: str, dtype, name: str):
    """The text encoder of ``subfolder``'s config from the checkpoint's ``encoder`` layout ("clip",
    "openclip", "sgm-clip", "sgm-openclip"), strictly checked."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(str(config_dir), subfolder=subfolder, local_files_only=True)
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if encoder == "sgm-openclip" else CLIPTextModel)(config)
    expected = model.state_dict()
    state = _text_encoder_state_dict(checkpoint, encoder, list(expected), config.num_hidden_layers)
    missing = [key for key in expected if key not in state and not key.endswith("position_ids")]
    if missing:
        raise ModelError(
            f"{name} lacks {len(missing)} text-encoder weights that its config expects (e.g. {missing[0]}); "
            "pass --model-config DIR of its architecture"
        )
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if wrong:
        key = wrong[0]
        raise ModelError(
            f"{name}: text-encoder weight {key} is {tuple(state[key].shape)}, its config expects "
            f"{tuple(expected[key].shape)}; pass --model-config DIR of its architecture"
        )
    buffers = {key for key, _ in model.named_buffers()}
    state = {key: value for key, value in state.items() if key in expected and key not in buffers}
    model.load_state_dict(state, strict=False, assign=True)
    for key in buffers:  # position_ids: rebuilt, never read from files (many carry broken ones)
        module_name, _, buffer = key.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, buffer, torch.arange(getattr(module, buffer).shape[-1]).expand(1, -1))
    model.to(dtype=dtype)
    return model.eval()


def _text_encoder_state_dict(checkpoint, encoder: str, model_keys: list[str], num_layers: int) -> dict:
    """The checkpoint's text encoder under the keys of transformers' CLIPTextModel (with or
    without its ``text_model.`` level, as ``model_keys`` have it)."""
    nested = any(key.startswith("text_model.") for key in model_keys)
    state = {}
    if encoder in ("clip", "sgm-clip"):
        prefix = CLIP_PREFIX if encoder == "clip" else SGM_CLIP_PREFIX
        for key, value in checkpoint.items():
            if key.startswith(prefix):
                state[key[len(prefix):].removeprefix("text_model.")] = value
    else:
        prefix = OPENCLIP_PREFIX if encoder == "openclip" else SGM_OPENCLIP_PREFIX
        state = _from_openclip(checkpoint, num_layers, prefix)
    projection = state.pop("text_projection.weight", None)  # CLIPTextModelWithProjection's, outside text_model
    state = {(f"text_model.{key}" if nested else key): value for key, value in state.items()}
    if projection is not None:
        state["text_projection.weight"] = projection
    return state


def _from_openclip(checkpoint, num_layers: int, prefix: str = OPENCLIP_PREFIX) -> dict:
    """OpenCLIP's text tower (SD 2.x; SDXL's second encoder) in CLIPTextModel keys; layers past
    ``num_layers`` (SD 2 drops OpenCLIP's last) are left out; SDXL's projection ([width, projection],
    applied as x @ P) becomes CLIPTextModelWithProjection's ``text_projection.weight`` (P transposed)."""
    layer_names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    top = {"token_embedding.weight": "embeddings.token_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight",
           "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    state = {}
    for key, value in checkpoint.items():
        rest = key.removeprefix(prefix)
        if rest == key:
            continue
        if rest == "text_projection" and prefix == SGM_OPENCLIP_PREFIX:
            state["text_projection.weight"] = value.t().contiguous()
            continue
        if rest in top:
            state[top[rest]] = value
            continue
        match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+?)\.?(weight|bias)", rest)
        if match is None or int(match[1]) >= num_layers:
            continue
        layer, module, part = int(match[1]), match[2], match[3]
        if module == "attn.in_proj_":  # q, k and v stacked
            for projection, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                state[f"encoder.layers.{layer}.self_attn.{projection}.{part}"] = chunk
        elif module in layer_names:
            state[f"encoder.layers.{layer}.{layer_names[module]}.{part}"] = value
    return state


# --------------------------------------------------------------------------- writing


_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _resnet_key(rest: str) -> str:
    head, _, tail = rest.partition(".")
    for new, old in _RESNET_TO_LDM:
        if head == new:
            return f"{old}.{tail}"
    raise ModelError(f"unexpected UNet resnet weight {rest!r}")


def _unet_to_ldm(unet) -> dict:
    per_block = unet.config.layers_per_block + 1  # LDM numbers the downsampler as a layer of its own
    plain = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
    with_attention = {index for index, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)}
    out = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        if module in plain:
            new = f"{plain[module]}.{param}"
        elif match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            index = per_block * block + layer + 1
            new = (f"input_blocks.{index}.0.{_resnet_key(rest)}" if kind == "resnets"
                   else f"input_blocks.{index}.1.{rest}")
        elif match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{per_block * (int(match[1]) + 1)}.0.op.{match[2]}"
        elif match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(match[1])}.{_resnet_key(match[2])}"
        elif match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{match[1]}"
        elif match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            index = per_block * block + layer
            new = (f"output_blocks.{index}.0.{_resnet_key(rest)}" if kind == "resnets"
                   else f"output_blocks.{index}.1.{rest}")
        elif match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(match[1])
            slot = 2 if block in with_attention else 1
            new = f"output_blocks.{per_block * block + per_block - 1}.{slot}.conv.{match[2]}"
        else:
            raise ModelError(f"unexpected UNet weight {key!r}: not an SD 1.x/2.x/SDXL UNet")
        out[UNET_PREFIX + new] = value
    return out


def _vae_to_ldm(vae) -> dict:
    blocks = len(vae.config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out")
        if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{match[1]}.mid.attn_1.{attention[match[2]]}.{match[3]}"
            if match[3] == "weight" and match[2] != "group_norm":
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        elif match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{match[1]}.block.{match[2]}.{match[3]}"
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{blocks - 1 - int(match[1])}.block.{match[2]}.{match[3]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
        out[VAE_PREFIX + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out
