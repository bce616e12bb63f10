"""The glue of ``stc export --format diffusers``: hooks that let a plain diffusers pipeline
render stc concepts.

This file is a template, never imported by stc (it imports nothing from stc). An export's
``stc_concept.py`` is written by ``stc/exchange/diffusers_folder.py``: stc's own mapper, text-encoding,
attention and key/value assembly code, copied at export time from ``stc/method/mapper_config.py``,
``stc/method/mapper.py``, ``stc/method/spacetime.py``, ``stc/method/encoding.py``, ``stc/method/conditioning.py`` and
``stc/render/generation.py``, followed by the part of this file below the ``glue`` line, which
uses their names (``NeTIMapper``, ``MapperConfig``, ``ConceptSlot``, ``Conditioning``, ``SpaceTimeConditioning``,
``cross_attention_layer_names``, ``install_processors``, ``encode_schedule``, ``stack_step``,
``with_uncond``, ``check_rank``, ``placeholder_tokens``, ``pipeline_text_encoders``, ``pipeline_tokenizers``,
``add_placeholder_tokens``) and the constants the export writes (``EXPORT_FORMAT``,
``ModelError``, ``BadInput``). The imports above that line are the glue's own; the export adds those the
copied code needs.

How a render works: a forward pre-hook on the text encoder notes the input ids of every
prompt the pipeline encodes; at the first UNet call after that (the scheduler's timesteps are
set by then) the prompt's keys and values for every (step, layer) are computed once, as
``stc gen`` computes them; every UNet call then gets them for its timestep through
``cross_attention_kwargs={"spacetime": ...}``, the unconditional half reading the pipeline's
own encoding of the negative prompt in every layer.
"""

import dataclasses
import functools
import hashlib
import json
import types
from pathlib import Path

import torch

# ---------------------------------------------------------------------------- glue

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "mapper.safetensors"


def read_config(folder) -> dict:
    """The ``config.json`` of an stc diffusers export, its format checked."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} is not an stc diffusers export: cannot read {CONFIG_FILE} ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{path} has format {found!r}; this module reads {EXPORT_FORMAT!r}")
    return config


def load_mapper(folder, config: dict | None = None):
    """The concept's mapper (fp32, CPU, eval mode), its weights checked against config.json."""
    from safetensors.torch import load

    folder = Path(folder)
    config = config or read_config(folder)
    data = (folder / WEIGHTS_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != config["weights_sha256"]:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match the sha256 in {CONFIG_FILE}; the export is damaged")
    mapper = NeTIMapper(MapperConfig.from_dict(config["mapper"]), generator=torch.Generator().manual_seed(0))
    mapper.load_state_dict({key: value.float() for key, value in load(data).items()}, strict=True)
    return mapper.eval().requires_grad_(False)


def load_concept(pipe, folder, rank: int | None = None) -> str:
    """Teach ``pipe`` the concept exported in ``folder``; returns its token, e.g. ``"<cat>"``.

    Afterwards ``pipe("<cat> on the moon", ...)`` renders the concept as ``stc gen`` does.
    ``rank`` truncates it (1 = coarsest and most editable, the mapper's hidden size = full);
    None: the export's default rank (``rank`` in config.json; null there = full). Call once
    per concept to use several in one prompt; prompts without a loaded token render as the
    untouched pipeline does.
    """
    config = read_config(folder)
    mapper = load_mapper(folder, config)
    rank = config.get("rank") if rank is None else int(rank)
    if rank is not None:
        check_rank(config["name"], rank, mapper.config.rank_max)
    readings = [types.SimpleNamespace(**reading) for reading in config["text_encoders"]]
    encoders = pipeline_text_encoders(pipe, readings)
    widths = [encoder.module.config.hidden_size for encoder in encoders]
    wanted = mapper.config.encoder_widths or [config["text_width"]]
    if widths != list(wanted):
        raise ModelError(
            f"{config['token']} was trained for text encoders of width {'+'.join(map(str, wanted))} "
            f"({config['base_model']}); this pipeline's are {'+'.join(map(str, widths))} wide"
        )
    if cross_attention_layer_names(pipe.unet) != list(config["layer_names"]):
        raise ModelError(
            f"{config['token']} was trained on a UNet with other cross-attention layers ({config['base_model']})"
        )
    hooks = SpaceTimeHooks.of(pipe, encoders)
    tokens = placeholder_tokens(config["token"], mapper.config.num_vectors)
    token_ids = [_add_tokens(tokenizer, encoder.module, tokens, config["initializer"])
                 for tokenizer, encoder in zip(pipeline_tokenizers(pipe, readings), encoders)]
    slot = ConceptSlot.of(token_ids, mapper.to(pipe.text_encoder.device), rank)
    hooks.slots[slot.token_id] = slot
    return config["token"]


def unload_concepts(pipe) -> None:
    """Remove the hooks and processors ``load_concept`` installed (added tokens stay)."""
    hooks = getattr(pipe, SpaceTimeHooks.ATTRIBUTE, None)
    if hooks is not None:
        hooks.remove()


def _add_tokens(tokenizer, text_encoder, tokens: list[str], initializer: str) -> list[int]:
    """Add ``tokens`` (the concept's placeholder: several for an n-vector concept, which diffusers
    then writes out in the prompt) to a tokenizer and rows to its text encoder's input embeddings.

    A row (the initializer word's embedding) is only what the pipeline's own encoding of the
    prompt reads; the UNet reads the mapper's space-time encodings instead.
    """
    token_ids = add_placeholder_tokens(tokenizer, tokens)
    embeddings = text_encoder.get_input_embeddings()
    if max(token_ids) >= embeddings.num_embeddings:
        weight = embeddings.weight.detach()
        init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
        row = weight[init_ids].mean(dim=0) if init_ids else weight.mean(dim=0)
        extra = max(token_ids) + 1 - weight.shape[0]
        grown = torch.cat([weight, row.unsqueeze(0).expand(extra, -1)])
        text_encoder.set_input_embeddings(
            torch.nn.Embedding.from_pretrained(grown, freeze=True, padding_idx=embeddings.padding_idx)
        )
        text_encoder.config.vocab_size = grown.shape[0]
    return token_ids


class SpaceTimeHooks:
    """One per pipeline: its concepts (token id -> ConceptSlot), hooks and current render."""

    ATTRIBUTE = "_stc_spacetime"

    @classmethod
    def of(cls, pipe, encoders) -> "SpaceTimeHooks":
        hooks = getattr(pipe, cls.ATTRIBUTE, None)
        if hooks is None:
            hooks = cls(pipe, encoders)
            setattr(pipe, cls.ATTRIBUTE, hooks)
        return hooks

    def __init__(self, pipe, encoders):
        self.pipe = pipe
        self.slots = {}  # token id -> ConceptSlot
        self.original_processors = dict(pipe.unet.attn_processors)
        self.num_layers = len(install_processors(pipe.unet))
        self.encoders = encoders  # the pipeline's text encoders, as config.json's text_encoders read them
        self.encoded_ids = [[] for _ in self.encoders]  # per text encoder: the input ids it read since the UNet ran
        self.render = None  # the current render's space-time conditioning; None: plain diffusers
        self.handles = [
            encoder.module.register_forward_pre_hook(functools.partial(self._on_text_encoder, index), with_kwargs=True)
            for index, encoder in enumerate(self.encoders)
        ] + [pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.pipe.unet.set_attn_processor(self.original_processors)
        delattr(self.pipe, self.ATTRIBUTE)

    def _on_text_encoder(self, index, module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is not None:
            self.encoded_ids[index].append(input_ids.detach())

    def _on_unet(self, module, args, kwargs):
        names = ("sample", "timestep", "encoder_hidden_states")
        given = {name: args[index] if len(args) > index else kwargs.get(name) for index, name in enumerate(names)}
        added = kwargs.get("added_cond_kwargs")
        if self.encoded_ids[0]:  # a new render: the pipeline encoded the prompt first, then the negative one
            prompts = [ids[0] if ids else None for ids in self.encoded_ids]
            self.encoded_ids = [[] for _ in self.encoders]
            self.render = self._schedule(prompts, given["encoder_hidden_states"])
        render = self.render
        if render is None:
            return None
        hidden = given["encoder_hidden_states"]
        if hidden is None or (hidden is not render.hidden and not torch.equal(hidden, render.hidden)):
            self.render = None  # the UNet is called with other embeddings: not this render any more
            return None
        pipeline_pooled = added.get("text_embeds") if added else None
        spacetime, pooled = self._step(render, given["timestep"], hidden, pipeline_pooled, given["sample"].shape[0])
        cross_attention_kwargs = dict(kwargs.get("cross_attention_kwargs") or {}, spacetime=spacetime)
        kwargs = {**kwargs, "cross_attention_kwargs": cross_attention_kwargs}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled}
        return args, kwargs

    def _schedule(self, input_ids, hidden):
        """Each prompt's Conditioning for the whole schedule, as stc's TextConditioner.schedule
        computes it (encode_schedule). Prompts without a loaded concept read the
        pipeline's own encoding (filled in per step). None: no prompt names a concept."""
        if any(ids is None for ids in input_ids):
            return None  # prompt embeddings passed in for some encoder: nothing to re-encode
        first = input_ids[0]
        timesteps = self.pipe.scheduler.timesteps.to(first.device)
        conditionings, computed = [], {}
        for index, ids in enumerate(first):
            slots = {
                token_id: dataclasses.replace(slot, mapper=slot.mapper.to(ids.device))
                for token_id, slot in self.slots.items()
                if bool((ids == token_id).any())
            }
            if not slots:
                conditionings.append(None)
                continue
            prompt_ids = [encoder_ids[index].unsqueeze(0) for encoder_ids in input_ids]
            key = tuple(tuple(row.flatten().tolist()) for row in prompt_ids)
            if key not in computed:
                keys, values, pooled = encode_schedule(self.encoders, prompt_ids, timesteps, self.num_layers, slots)
                ranks = {str(token_id): slot.rank for token_id, slot in slots.items()}
                computed[key] = Conditioning(ranks=ranks, negative=None, positive=None, keys=keys, values=values,
                                             pooled=pooled)
            conditionings.append(computed[key])
        if all(conditioning is None for conditioning in conditionings):
            return None
        return _Render(timesteps=timesteps, conditionings=conditionings, hidden=hidden)

    def _step(self, render, timestep, hidden, pipeline_pooled, batch: int):
        """The per-layer keys and values of one UNet call, as stc's denoising loop builds them:
        L x batch x S x D, the plain negative encoding first when the batch holds both CFG halves;
        and (SDXL) the pooled embeddings, the pipeline's own for the negative half and for
        prompts without a concept (None for models without them)."""
        matches = (render.timesteps == torch.as_tensor(timestep, device=render.timesteps.device)).nonzero()
        if matches.numel() == 0:
            raise RuntimeError(f"timestep {float(timestep)} is not in the schedule the concepts were encoded for")
        step_index = int(matches[0])
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0
        positive = hidden[batch // 2 :] if cfg else hidden  # B x S x D: the pipeline's own encodings
        positive_pooled = None
        if pipeline_pooled is not None:
            positive_pooled = pipeline_pooled[batch // 2 :] if cfg else pipeline_pooled
        count, prompts = positive.shape[0], len(render.conditionings)
        if count % prompts:
            raise RuntimeError(f"a UNet batch of {count} images does not fit {prompts} prompts")
        per_prompt = count // prompts

        def plain(index):
            row = index * per_prompt
            state = positive[row].unsqueeze(0)
            pooled = positive_pooled[row].unsqueeze(0) if positive_pooled is not None else None
            return Encoding(state, state, pooled)

        conditionings = [
            conditioning if conditioning is not None else Conditioning(ranks={}, negative=None, positive=plain(index))
            for index, conditioning in enumerate(render.conditionings)
        ]
        samples = [conditionings[index // per_prompt] for index in range(count)]
        keys, values, pooled = stack_step(samples, step_index, self.num_layers)  # L x B x S x D; B x P
        if cfg:
            negative = hidden[: batch // 2]
            keys, values = with_uncond(negative, keys), with_uncond(negative, values)
            if pooled is not None:
                pooled = torch.cat([pipeline_pooled[: batch // 2], pooled.to(pipeline_pooled.dtype)])
        spacetime = SpaceTimeConditioning(keys=keys.to(hidden.device), values=values.to(hidden.device))
        if pooled is None or pipeline_pooled is None:
            return spacetime, None
        return spacetime, pooled.to(pipeline_pooled.device, pipeline_pooled.dtype)


class _Render:
    """One pipeline call: its schedule, each prompt's Conditioning (None: plain) and the
    encoder_hidden_states the pipeline passes to the UNet."""

    def __init__(self, timesteps, conditionings, hidden):
        self.timesteps, self.conditionings, self.hidden = timesteps, conditionings, hidden
