"""The space-time text encoding: a prompt encoded at every (timestep, layer) in batched calls.

Every placeholder token gets its concept's mapper output for the row's (t, l): the token
embedding goes into the text encoder's input, the textual bypass is added to its output state
for the values only (keys without it, values with it; docs/method.md, "Text encoding with the
textual bypass").
SD 1.x/2.x have one text encoder (final states); SDXL two (penultimate states side by side,
and the second's pooled embedding with the size "time ids"; docs/method.md, "SDXL"). Training
and rendering both encode through :func:`encode_layers`; the attention processors that read
the result are in ``spacetime.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mapper import encoder_outputs, split_outputs

BYPASS_SCALE = 0.2


# --------------------------------------------------------------------------- text encoding


@dataclass
class ConceptSlot:
    """A concept as the text encoder sees it: its placeholder token id, mapper and rank.

    ``mapper`` is what gets called (it may be wrapped for distributed training);
    ``config`` is its MapperConfig, which says how to split its outputs. A concept of n vectors
    (an imported n-vector embedding) has n tokens, ``<name> <name>_1 …``: ``token_id`` and then
    ``extra_token_ids``; the i-th takes the i-th vector. A model with several tokenizers (SDXL)
    may give the tokens other ids in the others: ``other_token_ids`` (one tuple per further
    tokenizer; empty: the same ids).
    """

    token_id: int
    mapper: torch.nn.Module
    rank: int | None = None  # None: the full concept
    config: object = None  # MapperConfig; None: ``mapper.config``
    extra_token_ids: tuple[int, ...] = ()
    other_token_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def token_ids(self) -> tuple[int, ...]:
        return (self.token_id, *self.extra_token_ids)

    def token_ids_for(self, encoder: int) -> tuple[int, ...]:
        """The placeholder's token ids in the tokenizer of text encoder ``encoder``."""
        return self.other_token_ids[encoder - 1] if encoder and self.other_token_ids else self.token_ids

    @classmethod
    def of(cls, token_ids: list[list[int]], mapper, rank: int | None = None, config=None) -> "ConceptSlot":
        """The slot of a concept whose placeholder tokens have ``token_ids[k]`` in tokenizer k."""
        first, *others = token_ids
        return cls(token_id=first[0], mapper=mapper, rank=rank, config=config, extra_token_ids=tuple(first[1:]),
                   other_token_ids=tuple(tuple(ids) for ids in others))

    def split(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return split_outputs(outputs, self.config or self.mapper.config)

    def parts(self, outputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per text encoder (token embeddings, bypass or None) of ``outputs``."""
        return encoder_outputs(outputs, self.config or self.mapper.config)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a base model and how its output becomes its part of the UNet's context.

    ``context``: "final", the last hidden state after the final LayerNorm (SD 1.x/2.x); or
    "penultimate", the hidden state before the last layer, without a LayerNorm (SDXL).
    ``pooled``: its projected, final-LayerNorm'd state at the end-of-text token
    (``end_token_id``, its tokenizer's) is the pooled embedding the UNet also reads (SDXL's
    second encoder).
    """

    module: torch.nn.Module
    context: str = "final"
    pooled: bool = False
    end_token_id: int | None = None


def pipeline_text_encoders(pipeline, readings) -> list[TextEncoder]:
    """The text encoders of a diffusers pipeline as ``readings`` describe them: one per encoder, in
    context order, each naming the pipeline's attributes of the encoder (``component``) and its
    tokenizer (``tokenizer``) and how its output is read (``context``, ``pooled``), as a model
    family's backbone lists them (``stc/models/backbones``)."""
    return [TextEncoder(getattr(pipeline, reading.component), reading.context, reading.pooled,
                        getattr(pipeline, reading.tokenizer).eos_token_id if reading.pooled else None)
            for reading in readings]


def pipeline_tokenizers(pipeline, readings) -> list:
    """The tokenizers of a diffusers pipeline, one per text encoder of ``readings``, in encoder order."""
    return [getattr(pipeline, reading.tokenizer) for reading in readings]


@dataclass
class Encoding:
    """Text encoded for cross-attention: keys (without the textual bypass) and values (with it),
    N x ... x S x D with every encoder's states side by side; the pooled embedding (N x ... x P)
    where the model has one."""

    keys: torch.Tensor
    values: torch.Tensor
    pooled: torch.Tensor | None = None


def text_transformer(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)


def causal_mask(transformer, hidden: torch.Tensor):
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


def encode_context(
    encoders: list[TextEncoder],
    input_ids: list[torch.Tensor],
    timesteps: torch.Tensor,
    layers: torch.Tensor,
    concepts: Mapping[int, ConceptSlot] | None = None,
    generator: torch.Generator | None = None,
) -> Encoding:
    """Encode N prompts, each at its own (timestep, layer), in one call of each text encoder.

    input_ids: one N x S tensor per encoder (its tokenizer's); timesteps, layers: N. Every
    placeholder token of a concept in ``concepts`` gets that concept's mapper output for the
    row's (t, l), each encoder its own part of it. Returns the keys (no bypass), the values (with
    the bypass at the placeholder positions) and, if an encoder pools, the pooled embedding.

    In training mode, nested dropout draws once per layer of this call (the reference's one
    mapper call per UNet layer and step): rows of one layer share the coin flip. The mapper runs
    once per placeholder token and row, on the first tokenizer's positions; the other encoders
    take their parts of the same outputs.
    """
    first = input_ids[0]
    calls = []  # (slot, vector, rows, cols, per-encoder parts)
    for slot in (concepts or {}).values():
        for vector, token_id in enumerate(slot.token_ids):
            rows, cols = (first == token_id).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            outputs = slot.mapper(
                timesteps[rows].float(), layers[rows].float(), rank=slot.rank,
                dropout_groups=layers[rows].long(), generator=generator,
            )
            calls.append((slot, vector, rows, cols, slot.parts(outputs)))
    keys, values, pooled = [], [], None
    for index, (encoder, ids) in enumerate(zip(encoders, input_ids)):
        placements = []  # (rows, cols, token embeddings, bypass or None)
        for slot, vector, rows, cols, parts in calls:
            token, bypass = parts[index]
            width = token.shape[-1] // len(slot.token_ids)
            piece = slice(vector * width, (vector + 1) * width)
            if index:
                token_id = slot.token_ids_for(index)[vector]
                rows_k, cols = (ids == token_id).nonzero(as_tuple=True)
                match = same_rows(rows, rows_k)
                token, bypass = token[match], (bypass[match] if bypass is not None else None)
                rows = rows_k
            placements.append((rows, cols, token[:, piece], bypass[:, piece] if bypass is not None else None))
        plain, bypassed, encoder_pooled = encode_one(encoder, ids, placements)
        keys.append(plain)
        values.append(bypassed)
        pooled = encoder_pooled if encoder_pooled is not None else pooled
    if len(keys) == 1:
        return Encoding(keys[0], values[0], pooled)
    return Encoding(torch.cat(keys, dim=-1), torch.cat(values, dim=-1), pooled)


def same_rows(rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """For each occurrence in ``other`` (rows of another tokenizer's placeholder positions), the
    index of an occurrence in ``rows`` of the same row, in order (both are sorted)."""
    if rows.shape == other.shape and torch.equal(rows, other):
        return torch.arange(rows.shape[0], device=rows.device)
    match = torch.searchsorted(rows, other)
    if bool((match >= rows.shape[0]).any()) or not torch.equal(rows[match.clamp(max=rows.shape[0] - 1)], other):
        raise ValueError("the tokenizers place a concept's tokens in other prompts: they do not share a vocabulary")
    return match


def encode_one(encoder: TextEncoder, input_ids: torch.Tensor, placements):
    """One text encoder's (keys, values, pooled or None): its token embeddings with the
    concepts' put in, its context state (the bypass added at their positions for the values)."""
    transformer = text_transformer(encoder.module)
    token_embedding = transformer.embeddings.token_embedding
    embeds = token_embedding(input_ids.clamp(max=token_embedding.num_embeddings - 1))  # N, S, D
    for rows, cols, token, _ in placements:
        embeds = embeds.index_put((rows, cols), token.to(embeds.dtype))
    hidden = transformer.embeddings(inputs_embeds=embeds)
    mask = causal_mask(transformer, hidden)
    if encoder.context == "final":
        state = transformer.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        plain, normalize, pooled = transformer.final_layer_norm(state), transformer.final_layer_norm, None
    else:  # the state before the last layer, as is; the last layer runs only for the pooled embedding
        state, last = penultimate_state(transformer, hidden, mask, need_last=encoder.pooled)
        plain, normalize = state, None
        pooled = pooled_state(encoder, transformer, last, input_ids) if encoder.pooled else None
    bypasses = [(rows, cols, bypass) for rows, cols, _, bypass in placements if bypass is not None]
    if not bypasses:
        return plain, plain, pooled
    bypassed = state
    for rows, cols, bypass in bypasses:
        existing = state[rows, cols]  # P, D
        scaled = F.normalize(bypass.to(existing.dtype), dim=-1) * existing.norm(dim=-1, keepdim=True)
        bypassed = bypassed.index_put((rows, cols), existing + BYPASS_SCALE * scaled)
    return plain, (normalize(bypassed) if normalize is not None else bypassed), pooled


def penultimate_state(transformer, hidden: torch.Tensor, mask, need_last: bool):
    """(the hidden state before the encoder's last layer, the last hidden state or None): what
    transformers' ``hidden_states[-2]`` and ``last_hidden_state`` are."""
    layers = transformer.encoder.layers
    if len(layers) < 2:
        last = transformer.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return hidden, last
    if not need_last:  # the encoder with its last layer left out
        full = transformer.encoder.layers
        transformer.encoder.layers = full[:-1]
        try:
            return transformer.encoder(inputs_embeds=hidden, attention_mask=mask,
                                       is_causal=True).last_hidden_state, None
        finally:
            transformer.encoder.layers = full
    captured = []
    handle = layers[-2].register_forward_hook(lambda module, args, output: captured.append(
        output[0] if isinstance(output, tuple) else output))
    try:
        last = transformer.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    finally:
        handle.remove()
    return captured[0], last


def pooled_state(encoder: TextEncoder, transformer, last: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The projected pooled embedding: the final-LayerNorm'd last state at the first end-of-text
    token. (transformers' CLIP pools at the largest token id when its config has the legacy end
    id 2, as SDXL's second encoder does: that is the end-of-text token until placeholder tokens
    are added after it, and stc's rule gives the same embedding for every prompt without one.)"""
    final = transformer.final_layer_norm(last)
    end = encoder.end_token_id
    if end is None:
        end = getattr(transformer, "eos_token_id", None) or transformer.config.eos_token_id
    rows = torch.arange(final.shape[0], device=final.device)
    pooled = final[rows, (input_ids == end).int().argmax(dim=-1)]
    projection = getattr(encoder.module, "text_projection", None)
    return projection(pooled) if projection is not None else pooled


def encode_layers(
    text_encoder,
    input_ids,
    timesteps: torch.Tensor,
    num_layers: int,
    concepts: Mapping[int, ConceptSlot] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Encoding:
    """Keys and values (and pooled embeddings) of N prompts, each at its own timestep, for every layer.

    ``text_encoder``: one text encoder, or a list of :class:`TextEncoder` (``text_encoders(pipe)``)
    with ``input_ids`` one tensor per encoder; each N x S (or 1 x S, shared by all N);
    timesteps: N. Returns N x L x S x D keys and values (N x L x P pooled embeddings), computed
    in ceil(N·L / chunk_size) batched calls of each text encoder (one when ``chunk_size`` is
    None). Training (N = batch) and rendering (N = schedule steps) both encode through here.
    """
    encoders = text_encoder if isinstance(text_encoder, list) else [TextEncoder(text_encoder)]
    input_ids = input_ids if isinstance(input_ids, (list, tuple)) else [input_ids]
    count = timesteps.shape[0]
    row_timesteps, row_layers = spacetime_rows(timesteps, num_layers)
    row_ids = [ids.repeat_interleave(num_layers, dim=0) if ids.shape[0] == count else None for ids in input_ids]
    total = count * num_layers
    chunk_size = chunk_size or total
    keys, values, pooled = [], [], []
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        ids = [rows[start:stop] if rows is not None else shared.expand(stop - start, -1)
               for rows, shared in zip(row_ids, input_ids)]
        encoding = encode_context(encoders, ids, row_timesteps[start:stop], row_layers[start:stop], concepts, generator)
        keys.append(encoding.keys)
        values.append(encoding.values)
        if encoding.pooled is not None:
            pooled.append(encoding.pooled)
    shape = (count, num_layers, *keys[0].shape[1:])
    pooled = torch.cat(pooled).view(count, num_layers, -1) if pooled else None
    return Encoding(torch.cat(keys).view(shape), torch.cat(values).view(shape), pooled)


# --------------------------------------------------------------------------- SDXL's added conditioning


def uses_pooled_embedding(unet) -> bool:
    """Whether ``unet`` also reads a pooled text embedding and size ids (SDXL's "text_time")."""
    return unet.config.get("addition_embed_type") == "text_time"


def size_time_ids(height: int, width: int, batch: int, device, dtype) -> torch.Tensor:
    """SDXL's "time ids" of ``batch`` images of height x width px: original size, crop top-left,
    target size = [H, W, 0, 0, H, W] (what StableDiffusionXLPipeline passes by default and what
    stc trains with: uncropped photos at the training size)."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
    return ids.expand(batch, -1)


SCHEDULE_CHUNK = 256  # (step, layer) rows per text-encoder call of a whole schedule


def pooled_over_layers(pooled):
    """N x L x P pooled embeddings of each (t, l) -> the N x P one the UNet reads at each t: their
    mean over layers (the UNet takes one pooled embedding per call; docs/method.md, "SDXL")."""
    return pooled.mean(dim=1) if pooled is not None else None


def encode_schedule(encoders, input_ids, timesteps, num_layers: int, slots: dict):
    """One prompt's keys and values for every (step, layer) of ``timesteps``, in chunks of
    SCHEDULE_CHUNK rows, each distinct timestep encoded once, and the pooled embedding of every
    step (the mean over layers): K x L x S x D, K x L x S x D, and K x P or None."""
    unique, inverse = torch.unique(timesteps, return_inverse=True)
    repeated = unique.shape[0] < timesteps.shape[0]
    with torch.no_grad():
        encoding = encode_layers(encoders, input_ids, unique if repeated else timesteps, num_layers, slots,
                                 chunk_size=SCHEDULE_CHUNK)
    keys, values, pooled = encoding.keys, encoding.values, pooled_over_layers(encoding.pooled)
    if repeated:
        keys, values = keys[inverse], values[inverse]
        pooled = pooled[inverse] if pooled is not None else None
    return keys, values, pooled
