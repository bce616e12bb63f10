"""The text conditioning of a render: what every (step, layer) of the UNet reads.

Speed (``docs/method.md``, "Fast paths"): the conditioning of a prompt at one set of ranks is
computed once for the whole schedule — every (step, layer) in ceil(K·L / 256) batched
text-encoder calls — and shared by every image that uses it. Repeated timesteps (PNDM's
warm-up) are encoded once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import BadInput

MEAN_FLOOR = 1e-4  # a weighted state's mean below this fraction of its mean magnitude is taken as 0


@dataclass
class Conditioning:
    """The text conditioning of one prompt at one set of ranks, for one schedule.

    negative, positive: the stock :class:`~stc.method.encoding.Encoding` of the negative
    prompt and of the prompt (1 x S x D; its pooled embedding 1 x P on SDXL); the positive one
    is what every layer reads when the prompt names no concept. A negative prompt that uses
    concepts (``<easynegative>``) is its own Conditioning instead (keys and values per step and
    layer, its ``negative`` None). keys, values: K x L x S x D per
    (step, layer) sequences without and with the textual bypass, or None without concepts;
    pooled: K x P, the pooled embedding of each step (SDXL), the mean over layers of each
    layer's (docs/method.md, "SDXL").
    """

    ranks: dict[str, int]
    negative: object
    positive: object
    keys: object | None = None
    values: object | None = None
    pooled: object | None = None

    def at_step(self, step_index: int, num_layers: int):
        """Keys and values (L x S x D each) and the pooled embedding (P, or None) of one step."""
        if self.keys is None:
            plain = self.positive.keys[0].expand(num_layers, -1, -1)
            pooled = self.positive.pooled[0] if self.positive.pooled is not None else None
            return plain, plain, pooled
        return self.keys[step_index], self.values[step_index], (
            self.pooled[step_index] if self.pooled is not None else None)


class TextConditioner:
    """Encodes prompts with a model's text encoders (:class:`~stc.method.encoding.TextEncoder`, in
    context order) and their tokenizers, which know the concepts' placeholder tokens.

    ``zero_empty_negative``: an empty negative prompt is zeros, not its encoding (a pipeline made
    with ``force_zeros_for_empty_prompt``, as SDXL base is).
    """

    def __init__(self, encoders: list, tokenizers: list, device: str, slots: dict, num_layers: int,
                 tokens: dict | None = None, zero_empty_negative: bool = False, segmenter=None):
        self.encoders, self.tokenizers = encoders, tokenizers
        self.device, self.slots, self.num_layers = device, slots, num_layers
        self.tokens = tokens or {}  # concept name -> its placeholder tokens (several for n-vector concepts)
        self.zero_empty_negative = zero_empty_negative
        # text -> [(text, weight), ...]: the prompt weighting syntax (render/prompts.py); None: none
        self.segmenter = segmenter

    def _expand(self, text: str) -> str:
        from .placeholders import expand_placeholders

        for tokens in self.tokens.values():
            text = expand_placeholders(text, tokens)
        return text

    def tokenize(self, text: str) -> list:
        """The token ids of ``text`` in each tokenizer (1 x S each), placeholders expanded (and the
        weighting syntax read, with a segmenter)."""
        return self.tokenize_weighted(text)[0]

    def tokenize_weighted(self, text: str) -> tuple[list, list | None]:
        """(the token ids of ``text`` in each tokenizer, 1 x S each; each token's weight in each,
        1 x S, or None when every weight is 1). A weighted prompt is tokenized segment by segment,
        as the A1111 webui does; an unweighted one as a whole, as diffusers does."""
        import torch

        segments = self.segmenter(text) if self.segmenter is not None else [(text, 1.0)]
        if segments == [(text, 1.0)]:
            return [tokenizer([self._expand(text)], padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)
                    for tokenizer in self.tokenizers], None
        ids, weights = [], []
        for tokenizer in self.tokenizers:
            token_ids, token_weights = [], []
            for segment, weight in segments:
                piece = tokenizer(self._expand(segment), add_special_tokens=False).input_ids
                token_ids += piece
                token_weights += [weight] * len(piece)
            inner = tokenizer.model_max_length - 2  # between the start and end tokens
            padding = inner - len(token_ids[:inner])
            ids.append(torch.tensor([[tokenizer.bos_token_id, *token_ids[:inner], tokenizer.eos_token_id]
                                     + [tokenizer.pad_token_id] * padding], device=self.device))
            weights.append(torch.tensor([[1.0, *token_weights[:inner], 1.0] + [1.0] * padding], device=self.device))
        if all(bool((weight == 1).all()) for weight in weights):
            return ids, None
        return ids, weights

    def emphasize(self, states, weights):
        """``states`` (... x S x D, every encoder's side by side) with each encoder's part weighted
        per token as the A1111 webui weights its text encoder's output: each token's state times
        its weight, then the whole rescaled to the mean it had (per row: each (step, layer))."""
        import torch

        if weights is None:
            return states
        widths = [state_width(encoder) for encoder in self.encoders]
        parts = []
        for part, weight in zip(states.split(widths, dim=-1), weights):
            original = part.mean(dim=(-2, -1), keepdim=True)
            scaled = part * weight.to(part.dtype).reshape(weight.shape[-1], 1)  # S, 1 over ... x S x D
            new = scaled.mean(dim=(-2, -1), keepdim=True)
            # a state whose mean is ~0 (a LayerNorm without bias: random test models) has no mean to
            # restore; the webui would divide by ~0 there: such rows keep the plain product
            degenerate = new.abs() <= MEAN_FLOOR * scaled.abs().mean(dim=(-2, -1), keepdim=True)
            parts.append(scaled * torch.where(degenerate, torch.ones_like(new), original / new))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def plain(self, text: str):
        """The stock text encoding of ``text`` (an Encoding, 1 x S x D): one call of each text
        encoder, read as diffusers' pipelines read it (each encoder's context state, "final" or
        "penultimate", side by side, and the pooling one's projected pooled token)."""
        import torch

        from .encoding import Encoding

        input_ids, weights = self.tokenize_weighted(text)
        with torch.no_grad():
            states, pooled = [], None
            for encoder, encoder_ids in zip(self.encoders, input_ids):
                penultimate = encoder.context == "penultimate"
                output = encoder.module(encoder_ids, output_hidden_states=penultimate)
                states.append(output.hidden_states[-2] if penultimate else output.last_hidden_state)
                pooled = output.text_embeds if encoder.pooled else pooled
            hidden = self.emphasize(torch.cat(states, dim=-1), weights)
            return Encoding(hidden, hidden, pooled)

    def negative(self, text: str):
        """The encoding of the negative prompt: :meth:`plain`, except that an empty one is zeros
        with ``zero_empty_negative``, as StableDiffusionXLPipeline gives when no negative prompt
        is passed."""
        import torch

        from .encoding import Encoding

        encoding = self.plain(text)
        if text or not self.zero_empty_negative:
            return encoding
        pooled = torch.zeros_like(encoding.pooled) if encoding.pooled is not None else None
        return Encoding(torch.zeros_like(encoding.keys), torch.zeros_like(encoding.values), pooled)

    def schedule(self, text: str, ranks: dict[str, int], timesteps):
        """Keys and values of ``text`` (concept references without inline ranks) for every
        (step, layer) of ``timesteps``, and the pooled embedding of every step: K x L x S x D,
        K x L x S x D, and K x P or None."""
        from .encoding import encode_schedule

        input_ids, weights = self.tokenize_weighted(text)
        slots = {}
        for name, rank in ranks.items():
            slot = self.slots[name]
            if not all(bool((input_ids[0] == token_id).any()) for token_id in slot.token_ids):
                limit = self.tokenizers[0].model_max_length
                raise BadInput(f"<{name}> falls beyond the text encoder's {limit} tokens; shorten the prompt")
            slots[slot.token_id] = dataclasses.replace(slot, rank=rank)
        keys, values, pooled = encode_schedule(self.encoders, input_ids, timesteps, self.num_layers, slots)
        return self.emphasize(keys, weights), self.emphasize(values, weights), pooled

    def condition(self, text: str, ranks: dict[str, int], timesteps, negative) -> Conditioning:
        if not ranks:
            return Conditioning(ranks={}, negative=negative, positive=self.plain(text))
        keys, values, pooled = self.schedule(text, ranks, timesteps)
        return Conditioning(ranks=dict(ranks), negative=negative, positive=None, keys=keys, values=values,
                            pooled=pooled)


def state_width(encoder) -> int:
    """The width of a text encoder's part of the context (its hidden size)."""
    return int(encoder.module.config.hidden_size)
