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

SCHEDULE_CHUNK = 256  # (step, layer) rows per text-encoder call


@dataclass
class Conditioning:
    """The text conditioning of one prompt at one set of ranks, for one schedule.

    negative, positive: 1 x S x D stock encodings (the positive one is what every layer reads
    when the prompt names no concept). keys, values: K x L x S x D per (step, layer) sequences
    without and with the textual bypass, or None without concepts.
    """

    ranks: dict[str, int]
    negative: object
    positive: object
    keys: object | None = None
    values: object | None = None

    def at_step(self, step_index: int, num_layers: int):
        """Keys and values (L x S x D each) of one denoising step."""
        if self.keys is None:
            plain = self.positive.expand(num_layers, -1, -1)
            return plain, plain
        return self.keys[step_index], self.values[step_index]


class TextConditioner:
    """Encodes prompts for a pipeline whose tokenizer knows the concepts' placeholder tokens."""

    def __init__(self, pipeline, device: str, slots: dict, num_layers: int, tokens: dict | None = None):
        self.pipeline, self.device, self.slots, self.num_layers = pipeline, device, slots, num_layers
        self.tokens = tokens or {}  # concept name -> its placeholder tokens (several for n-vector concepts)

    def tokenize(self, text: str):
        from .placeholders import expand_placeholders

        for tokens in self.tokens.values():
            text = expand_placeholders(text, tokens)
        tokenizer = self.pipeline.tokenizer
        ids = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)  # 1, S

    def plain(self, text: str):
        """The stock text encoding of ``text`` (1 x S x D): one text-encoder call."""
        import torch

        with torch.no_grad():
            return self.pipeline.text_encoder(self.tokenize(text))[0]

    def schedule(self, text: str, ranks: dict[str, int], timesteps):
        """Keys and values of ``text`` (concept references without inline ranks) for every
        (step, layer) of ``timesteps``: two K x L x S x D tensors."""
        import torch

        from .spacetime import encode_layers

        input_ids = self.tokenize(text)
        slots = {}
        for name, rank in ranks.items():
            slot = self.slots[name]
            if not all(bool((input_ids == token_id).any()) for token_id in slot.token_ids):
                limit = self.pipeline.tokenizer.model_max_length
                raise BadInput(f"<{name}> falls beyond the text encoder's {limit} tokens; shorten the prompt")
            slots[slot.token_id] = dataclasses.replace(slot, rank=rank)
        unique, inverse = torch.unique(timesteps, return_inverse=True)
        repeated = unique.shape[0] < timesteps.shape[0]
        with torch.no_grad():
            keys, values = encode_layers(
                self.pipeline.text_encoder, input_ids, unique if repeated else timesteps, self.num_layers,
                slots, chunk_size=SCHEDULE_CHUNK,
            )
        return (keys[inverse], values[inverse]) if repeated else (keys, values)

    def condition(self, text: str, ranks: dict[str, int], timesteps, negative) -> Conditioning:
        if not ranks:
            return Conditioning(ranks={}, negative=negative, positive=self.plain(text))
        keys, values = self.schedule(text, ranks, timesteps)
        return Conditioning(ranks=dict(ranks), negative=negative, positive=None, keys=keys, values=values)
