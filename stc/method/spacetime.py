"""Space-time conditioning: UNet layer order, batched text encoding, attention processors.

Every cross-attention layer gets its own processor that knows its layer index from
construction (no call counter). The per-layer key and value sequences travel in
``cross_attention_kwargs={"spacetime": SpaceTimeConditioning(...)}``, so the result does not
depend on call order and survives gradient checkpointing (the recomputed module reads the
same index and the same tensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .mapper import split_outputs

BYPASS_SCALE = 0.2


# --------------------------------------------------------------------------- layer order

# The 16 cross-attention layers of SD 1.x/2.x UNets in execution order (docs/method.md, "Space").
SD_LAYER_NAMES = tuple(
    f"{block}.attentions.{index}.transformer_blocks.0.attn2"
    for block, count in (("down_blocks.0", 2), ("down_blocks.1", 2), ("down_blocks.2", 2), ("mid_block", 1),
                         ("up_blocks.1", 3), ("up_blocks.2", 3), ("up_blocks.3", 3))
    for index in range(count)
)


def _unet_blocks(unet) -> Iterator[tuple[str, object]]:
    for index, block in enumerate(unet.down_blocks):
        yield f"down_blocks.{index}", block
    if getattr(unet, "mid_block", None) is not None:
        yield "mid_block", unet.mid_block
    for index, block in enumerate(unet.up_blocks):
        yield f"up_blocks.{index}", block


def cross_attention_layer_names(unet) -> list[str]:
    """Names of the cross-attention ("attn2") modules in execution order.

    ``unet.attn_processors`` lists the mid block last; execution runs it between the down
    and up blocks, which is the order the method indexes layers by.
    """
    names = []
    for block_name, block in _unet_blocks(unet):
        for attn_index, transformer in enumerate(getattr(block, "attentions", None) or []):
            for block_index, layer in enumerate(getattr(transformer, "transformer_blocks", [])):
                if getattr(layer, "attn2", None) is not None:
                    names.append(f"{block_name}.attentions.{attn_index}.transformer_blocks.{block_index}.attn2")
    return names


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


def install_processors(unet, expected_layers: int | None = 16) -> list[str]:
    """Give every attention module of ``unet`` a SpaceTimeAttnProcessor; return layer names."""
    layer_names = cross_attention_layer_names(unet)
    if expected_layers is not None and len(layer_names) != expected_layers:
        raise ModelError(
            f"this UNet has {len(layer_names)} cross-attention layers; neural space-time concepts "
            f"need the {expected_layers} of Stable Diffusion 1.x/2.x"
        )
    index_of = {name: index for index, name in enumerate(layer_names)}
    processors = {}
    for processor_name in unet.attn_processors:
        module_name = processor_name.rsplit(".processor", 1)[0]
        processors[processor_name] = SpaceTimeAttnProcessor(index_of.get(module_name))
    unet.set_attn_processor(processors)
    return layer_names


# --------------------------------------------------------------------------- text encoding


@dataclass
class ConceptSlot:
    """A concept as the text encoder sees it: its placeholder token id, mapper and rank.

    ``mapper`` is what gets called (it may be wrapped for distributed training);
    ``config`` is its MapperConfig, which says how to split its outputs. A concept of n vectors
    (an imported n-vector embedding) has n tokens, ``<name> <name>_1 …``: ``token_id`` and then
    ``extra_token_ids``; the i-th takes the i-th vector.
    """

    token_id: int
    mapper: torch.nn.Module
    rank: int | None = None  # None: the full concept
    config: object = None  # MapperConfig; None: ``mapper.config``
    extra_token_ids: tuple[int, ...] = ()

    @property
    def token_ids(self) -> tuple[int, ...]:
        return (self.token_id, *self.extra_token_ids)

    def split(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return split_outputs(outputs, self.config or self.mapper.config)


def _text_transformer(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)


def _causal_mask(transformer, hidden: torch.Tensor):
    """The text encoder's causal mask, from transformers' own mask helper. Its arguments were
    renamed across transformers 5.x (input_embeds/inputs_embeds, past_key_values/cache,
    cache_position): they are passed by the names this version has."""
    from transformers.masking_utils import create_causal_mask

    code = getattr(create_causal_mask, "__wrapped__", create_causal_mask).__code__
    params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    kwargs = {"config": transformer.config, "attention_mask": None}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return create_causal_mask(**kwargs)


def spacetime_rows(timesteps: torch.Tensor, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, l) rows of N timesteps at every layer, sample-major: row n·L + l is (t_n, l)."""
    row_timesteps = timesteps.float().repeat_interleave(num_layers)  # N·L
    row_layers = torch.arange(num_layers, device=timesteps.device, dtype=torch.float32).repeat(timesteps.shape[0])
    return row_timesteps, row_layers


def encode_spacetime(
    text_encoder,
    input_ids: torch.Tensor,
    timesteps: torch.Tensor,
    layers: torch.Tensor,
    concepts: Mapping[int, ConceptSlot] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode N prompts, each at its own (timestep, layer), in one text-encoder call.

    input_ids: N x S; timesteps, layers: N. Every placeholder token of a concept in
    ``concepts`` gets that concept's mapper output for the row's (t, l). Returns the final
    hidden states without and with the textual bypass (N x S x D each): the keys and the
    values of cross-attention. They differ only at placeholder positions.

    In training mode, nested dropout draws once per layer of this call (the reference's one
    mapper call per UNet layer and step): rows of one layer share the coin flip.
    """
    transformer = _text_transformer(text_encoder)
    token_embedding = transformer.embeddings.token_embedding
    embeds = token_embedding(input_ids.clamp(max=token_embedding.num_embeddings - 1))  # N, S, D
    width = embeds.shape[-1]
    bypasses = []
    for slot in (concepts or {}).values():
        for vector, token_id in enumerate(slot.token_ids):
            rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            outputs = slot.mapper(
                timesteps[rows].float(), layers[rows].float(), rank=slot.rank,
                dropout_groups=layers[rows].long(), generator=generator,
            )
            token, bypass = slot.split(outputs)
            piece = slice(vector * width, (vector + 1) * width)
            embeds = embeds.index_put((rows, cols), token[:, piece].to(embeds.dtype))
            if bypass is not None:
                bypasses.append((rows, cols, bypass[:, piece]))

    hidden = transformer.embeddings(inputs_embeds=embeds)
    state = transformer.encoder(
        inputs_embeds=hidden, attention_mask=_causal_mask(transformer, hidden), is_causal=True
    ).last_hidden_state  # N, S, D, before the final LayerNorm
    plain = transformer.final_layer_norm(state)
    if not bypasses:
        return plain, plain
    bypassed = state
    for rows, cols, bypass in bypasses:
        existing = state[rows, cols]  # P, D
        scaled = F.normalize(bypass.to(existing.dtype), dim=-1) * existing.norm(dim=-1, keepdim=True)
        bypassed = bypassed.index_put((rows, cols), existing + BYPASS_SCALE * scaled)
    return plain, transformer.final_layer_norm(bypassed)


def encode_layers(
    text_encoder,
    input_ids: torch.Tensor,
    timesteps: torch.Tensor,
    num_layers: int,
    concepts: Mapping[int, ConceptSlot] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of N prompts, each at its own timestep, for every layer.

    input_ids: N x S (or 1 x S, shared by all N); timesteps: N. Returns two N x L x S x D
    tensors, computed in ceil(N·L / chunk_size) batched text-encoder calls (one when
    ``chunk_size`` is None). Training (N = batch) and rendering (N = schedule steps) both
    encode through here.
    """
    count = timesteps.shape[0]
    row_timesteps, row_layers = spacetime_rows(timesteps, num_layers)
    row_ids = input_ids.repeat_interleave(num_layers, dim=0) if input_ids.shape[0] == count else None
    total = count * num_layers
    chunk_size = chunk_size or total
    keys, values = [], []
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        ids = row_ids[start:stop] if row_ids is not None else input_ids.expand(stop - start, -1)
        plain, bypassed = encode_spacetime(
            text_encoder, ids, row_timesteps[start:stop], row_layers[start:stop], concepts, generator
        )
        keys.append(plain)
        values.append(bypassed)
    shape = (count, num_layers, *keys[0].shape[1:])
    return torch.cat(keys).view(shape), torch.cat(values).view(shape)
