"""Writing single-file (LDM-layout) checkpoints from diffusers pipelines: what the tests use to
make real single files from the builtin models. stc only reads such files (``stc.models.backbones.single_file``)."""

import re

import torch

from stc.models.backbones import single_file as ldm


def pipeline_to_ldm(pipeline, encoder: str | None = None) -> dict:
    """The pipeline's UNet, VAE and text encoder under the original LDM keys, as a single-file
    checkpoint has them (the inverse of what diffusers' ``from_single_file`` reads).

    ``encoder``: "clip" (SD 1.x layout) or "openclip" (SD 2.x layout); default: openclip for a
    text encoder with ``gelu`` layers (SD 2.x's), else clip. An SDXL pipeline is written in SDXL's
    SGM layout (both text encoders under ``conditioner.embedders.*``).
    """
    state = {}
    state.update(ldm._unet_to_ldm(pipeline.unet))
    state.update(ldm._vae_to_ldm(pipeline.vae))
    text = _text_state(pipeline.text_encoder)
    if getattr(pipeline, "text_encoder_2", None) is not None:  # SDXL: the SGM layout
        state.update({f"{ldm.SGM_CLIP_PREFIX}text_model.{key}": value for key, value in text.items()})
        second = _text_state(pipeline.text_encoder_2)
        projection = second.pop("text_projection.weight")
        state.update(_to_openclip(second, ldm.SGM_OPENCLIP_PREFIX, projection.t()))
    else:
        if encoder is None:
            encoder = "openclip" if pipeline.text_encoder.config.hidden_act == "gelu" else "clip"
        if encoder == "clip":
            state.update({f"{ldm.CLIP_PREFIX}text_model.{key}": value for key, value in text.items()})
        else:
            state.update(_to_openclip(text))
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def randomise(pipeline, seed: int = 0):
    """Move every parameter of the modules a single file holds (UNet, VAE, text encoders) off its
    initial value, in place, and return the pipeline.

    Freshly built models keep LayerNorm/GroupNorm weights at 1 and biases at 0: every norm equals
    every other of its width, so a key map that swaps two of them (OpenCLIP's ``ln_1`` and
    ``ln_2``, a resnet's ``norm1`` and ``norm2``) or a weight with its bias goes unseen. Here each
    parameter becomes ``p * (1 + 0.1 n) + 0.05 m`` (n, m standard normal, seeded): no two are
    equal, and the values stay near their scale, so the models still render sensibly."""
    generator = torch.Generator().manual_seed(seed)
    modules = [pipeline.unet, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)]
    with torch.no_grad():
        for module in filter(None, modules):
            for parameter in module.parameters():
                scale = torch.randn(parameter.shape, generator=generator)
                shift = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(parameter * (1 + 0.1 * scale) + 0.05 * shift)
    return pipeline


def _text_state(text_encoder) -> dict:
    text = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    text.pop("embeddings.position_ids", None)
    return text


def _to_openclip(text: dict, prefix: str = ldm.OPENCLIP_PREFIX, projection=None) -> dict:
    """OpenCLIP's keys; ``projection`` [width, projection dim] (SDXL's, applied as x @ P), else the
    identity (SD 2's, which no reader uses)."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {}
    width = text["embeddings.token_embedding.weight"].shape[1]
    out[prefix + "token_embedding.weight"] = text["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = text["embeddings.position_embedding.weight"]
    for part in ("weight", "bias"):
        out[f"{prefix}ln_final.{part}"] = text[f"final_layer_norm.{part}"]
    out[prefix + "text_projection"] = torch.eye(width) if projection is None else projection
    layers = sorted({int(m[1]) for key in text if (m := re.match(r"encoder\.layers\.(\d+)\.", key))})
    for layer in layers:
        source, target = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for part in ("weight", "bias"):
            out[f"{target}attn.in_proj_{part}"] = torch.cat(
                [text[f"{source}self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")])
            for new, old in names.items():
                out[f"{target}{old}.{part}"] = text[f"{source}{new}.{part}"]
    return out
