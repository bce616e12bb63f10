"""Space-time conditioning in the UNet: its layers in execution order, and the attention processors
that give each layer its own (t, l) keys and values (encoded in ``encoding.py``).

Every cross-attention layer gets its own processor that knows its layer index from
construction (no call counter). The per-layer key and value sequences travel in
``cross_attention_kwargs={"spacetime": SpaceTimeConditioning(...)}``, so the result does not
depend on call order and survives gradient checkpointing (the recomputed module reads the
same index and the same tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ModelError

# --------------------------------------------------------------------------- layer order


def unet_blocks(unet) -> Iterator[tuple[str, object]]:
    for index, block in enumerate(unet.down_blocks):
        yield f"down_blocks.{index}", block
    if getattr(unet, "mid_block", None) is not None:
        yield "mid_block", unet.mid_block
    for index, block in enumerate(unet.up_blocks):
        yield f"up_blocks.{index}", block


def cross_attention_layers(unet) -> list[tuple[str, list[str]]]:
    """The method's layers in execution order: (layer name, its cross-attention modules).

    A layer is an attention module (a ``Transformer2DModel``) with all its transformer blocks'
    cross-attentions ("attn2"), which read the same (t, l) conditioning. In SD 1.x/2.x every
    attention module has one block, so a layer is one attn2, named by it
    (``…attentions.0.transformer_blocks.0.attn2``); SDXL's modules have 2 or 10 blocks, named
    ``…attentions.0.transformer_blocks.*.attn2`` (docs/method.md, "SDXL").

    ``unet.attn_processors`` lists the mid block last; execution runs it between the down
    and up blocks, which is the order the method indexes layers by.
    """
    layers = []
    for block_name, block in unet_blocks(unet):
        for attn_index, transformer in enumerate(getattr(block, "attentions", None) or []):
            prefix = f"{block_name}.attentions.{attn_index}.transformer_blocks"
            modules = [f"{prefix}.{index}.attn2"
                       for index, layer in enumerate(getattr(transformer, "transformer_blocks", []))
                       if getattr(layer, "attn2", None) is not None]
            if modules:
                layers.append((modules[0] if len(modules) == 1 else f"{prefix}.*.attn2", modules))
    return layers


def cross_attention_layer_names(unet) -> list[str]:
    """Names of the method's layers (:func:`cross_attention_layers`) in execution order."""
    return [name for name, _ in cross_attention_layers(unet)]


# --------------------------------------------------------------------------- attention


@dataclass
class SpaceTimeConditioning:
    """Per-layer key and value sequences for one UNet call.

    keys, values: L x B x S x D (L cross-attention layers in execution order; B the UNet
    batch, CFG halves included).
    """

    keys: torch.Tensor
    values: torch.Tensor

    def for_layer(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer_index], self.values[layer_index]


class SpaceTimeAttnProcessor:
    """SDPA attention; cross-attention layers read their own (t, l) keys and values."""

    def __init__(self, layer_index: int | None = None):
        self.layer_index = layer_index

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        spacetime: SpaceTimeConditioning | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            key_states = value_states = hidden_states  # self-attention
        elif spacetime is not None and self.layer_index is not None:
            key_states, value_states = spacetime.for_layer(self.layer_index)
        else:
            key_states = value_states = encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            key_states = attn.norm_encoder_hidden_states(key_states)
            value_states = attn.norm_encoder_hidden_states(value_states)

        batch, _, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(key_states.to(query.dtype))
        value = attn.to_v(value_states.to(query.dtype))
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # B, H, Q, hd
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # B, H, S, hd
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_processors(unet) -> list[str]:
    """Give every attention module of ``unet`` a SpaceTimeAttnProcessor (each cross-attention
    its layer's index); return the layer names."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise ModelError("this UNet has no cross-attention layers; neural space-time concepts need a text-conditioned "
                         "Stable Diffusion UNet")
    index_of = {module: index for index, (_, modules) in enumerate(layers) for module in modules}
    processors = {}
    for processor_name in unet.attn_processors:
        module_name = processor_name.rsplit(".processor", 1)[0]
        processors[processor_name] = SpaceTimeAttnProcessor(index_of.get(module_name))
    unet.set_attn_processor(processors)
    return [name for name, _ in layers]
