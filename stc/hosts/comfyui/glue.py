"""The glue of stc's ComfyUI nodes: the part of ``stc_nodes.py`` that is ComfyUI's.

This file is a template, never imported by stc. ``stc comfyui install`` writes the node pack's
``stc_nodes.py``: stc's own mapper and space-time text encoding (``STITCHED`` in
``stc/hosts/comfyui/__init__.py``, copied from ``stc/method``), followed by the part of this file
below the ``glue`` line, which uses their names (``NeTIMapper``, ``MapperConfig``, ``ConceptSlot``,
``TextEncoder``, ``encode_schedule``, ``check_rank``, ``BadInput``) and the constants the pack
writes (``FILE_FORMAT``). It needs torch and safetensors, and ComfyUI's own modules when a node runs.

How a render works: "stc Text Encode" tokenizes the prompt with ComfyUI's CLIP tokenizers
(each placeholder token one id past the vocabulary) and returns a model with a
``SpaceTimePatch`` and the prompt's plain conditioning. ComfyUI calls the patch before
``to_k``/``to_v`` of every cross-attention; for the rows of a conditional chunk that hold this
prompt, the patch returns the keys (no bypass) and values (with the bypass) stc computes for the
step's timestep ``model_sampling.timestep(sigma)`` and the layer (``transformer_index``), all
layers of a timestep computed in one batched encoding and cached (every sampled sigma at the
first call). The unconditional chunk is untouched. A pooled embedding (SDXL) reaches the UNet
through ``y``: a UNet function wrapper puts the mean over layers at the step's timestep there.
"""

import json
import logging
import re
import types
from pathlib import Path

import torch

# ---------------------------------------------------------------------------- glue

LOG = logging.getLogger("stc")
PROMPT_LENGTH = 77  # one CLIP window: stc encodes a prompt's first 75 tokens


# --------------------------------------------------------------------------- the concept file


def read_concept_file(path) -> tuple[dict, dict]:
    """The decoded header metadata and the tensors of an stc single-file concept."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"stc concept file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise BadInput(f"{path.name} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != FILE_FORMAT:
        raise BadInput(f"{path.name} is not an stc concept file (format {metadata.get('format')!r}, not "
                       f"{FILE_FORMAT!r}); write one with: stc export NAME --format concept-file")
    decoded = dict(metadata)
    for key in ("mapper", "layer_names", "text_encoders", "text_encoder_layers", "rank", "rank_max"):
        decoded[key] = json.loads(metadata.get(key, "null"))
    return decoded, tensors


class LoadedConcept:
    """A concept file's mapper (fp32, eval) and what using it needs, at the rank chosen."""

    def __init__(self, path, rank: int = 0):
        self.path = Path(path)
        self.metadata, tensors = read_concept_file(path)
        self.name, self.token = self.metadata["name"], self.metadata["token"]
        config = MapperConfig.from_dict(self.metadata["mapper"])
        self.mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(0))
        try:
            self.mapper.load_state_dict({key: value.float() for key, value in tensors.items()}, strict=True)
        except RuntimeError as exc:
            raise BadInput(f"{self.path.name}: its tensors do not fit its mapper config") from exc
        self.mapper.eval().requires_grad_(False)
        default = self.metadata.get("rank")
        self.rank = int(rank) if rank else (int(default) if default else None)
        if self.rank is not None and config.rank_max is not None:
            check_rank(self.token, self.rank, config.rank_max)
        elif rank and config.rank_max is None:
            check_rank(self.token, int(rank), None)  # says the concept has no ranks
        self.layer_names = list(self.metadata["layer_names"])
        self.readings = [types.SimpleNamespace(**reading) for reading in self.metadata["text_encoders"]]
        self.label = self.metadata.get("family_label") or self.metadata.get("family", "?")


def check_concepts(concepts, widths: list[int], num_layers: int | None) -> None:
    """Every concept must be of the family of these text encoders (``widths``) and UNet layers."""
    if not concepts:
        raise BadInput("no stc concept given: connect an 'stc Load Concept' node")
    first = concepts[0]
    for concept in concepts:
        wanted = list(concept.mapper.config.widths)
        if wanted != list(widths):
            raise BadInput(f"{concept.token} is a {concept.label} concept (text encoders "
                           f"{'+'.join(map(str, wanted))} wide); this CLIP's are {'+'.join(map(str, widths))}: "
                           "load the checkpoint of its family")
        if num_layers is not None and len(concept.layer_names) != num_layers:
            raise BadInput(f"{concept.token} was trained on a UNet with {len(concept.layer_names)} cross-attention "
                           f"layers ({concept.label}); this model has {num_layers}")
        if [vars(r) for r in concept.readings] != [vars(r) for r in first.readings]:
            raise BadInput(f"{concept.token} and {first.token} read the text encoders differently")


# --------------------------------------------------------------------------- prompts


def prompt_ids(tokenizer, text: str, concepts, placeholder_ids) -> torch.Tensor:
    """1 x 77 token ids of ``text`` for one ComfyUI CLIP tokenizer (``SDTokenizer``: its
    transformers tokenizer, start, end and pad tokens), as stc's tokenizer gives them: each
    concept's placeholder (``<mydog>``) one id per vector (``placeholder_ids[token]``), the text
    between them tokenized as is."""
    tokens = {concept.token: placeholder_ids[concept.token] for concept in concepts}
    pattern = "(" + "|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)) + ")"
    ids = []
    for piece in re.split(pattern, text):
        if piece in tokens:
            ids.extend(tokens[piece])
        elif piece.strip():
            ids.extend(tokenizer.tokenizer(piece, add_special_tokens=False)["input_ids"])
    length = getattr(tokenizer, "max_length", PROMPT_LENGTH) or PROMPT_LENGTH
    ids = [tokenizer.start_token, *ids[: length - 2], tokenizer.end_token]
    ids += [tokenizer.pad_token] * (length - len(ids))
    return torch.tensor([ids], dtype=torch.long)


# --------------------------------------------------------------------------- the patch


class SpaceTimePatch:
    """The attn2 patch (and, with a pooled embedding, UNet wrapper) of one prompt.

    ``encoders``: TextEncoders in context order (stc's, over ComfyUI's CLIP modules); ``input_ids``:
    one 1 x S tensor per encoder; ``slots``: token id -> ConceptSlot; ``timestep_of(sigma)``: the
    model's timestep of a sigma. ``plain``: 1 x S x D, the conditioning the prompt's CONDITIONING
    carries, by which the patch knows its rows (the last position's vector).
    """

    def __init__(self, encoders, input_ids, slots, num_layers: int, timestep_of, plain, plain_pooled=None):
        self.encoders, self.input_ids, self.slots = encoders, input_ids, slots
        self.num_layers, self.timestep_of = num_layers, timestep_of
        self.plain, self.plain_pooled = plain, plain_pooled
        self.cache = {}  # float timestep -> (keys L x S x D, values L x S x D, pooled P or None)
        self.previous_wrapper = None

    def encode(self, timesteps: list[float]) -> None:
        """Encode the timesteps not cached yet, every layer of each, in one batched call."""
        missing = sorted({t for t in timesteps if t not in self.cache})
        if not missing:
            return
        keys, values, pooled = encode_schedule(self.encoders, self.input_ids, torch.tensor(missing), self.num_layers,
                                               self.slots)
        for index, t in enumerate(missing):
            self.cache[t] = (keys[index], values[index], pooled[index] if pooled is not None else None)

    def step(self, sigma, sample_sigmas=None):
        """The cached encoding of the timestep of ``sigma`` (every sampled sigma's encoded at the first miss)."""
        t = float(self.timestep_of(sigma))
        if t not in self.cache:
            wanted = [t]
            if sample_sigmas is not None:
                wanted += [float(self.timestep_of(s)) for s in sample_sigmas.reshape(-1)]
            self.encode(wanted)
        return self.cache[t]

    def rows(self, context, cond_or_uncond) -> list[int]:
        """The rows of ``context`` (B x S x D) in conditional chunks that hold this prompt."""
        if not cond_or_uncond or context.shape[1] != self.plain.shape[1] or context.shape[-1] != self.plain.shape[-1]:
            return []
        chunk = context.shape[0] // len(cond_or_uncond)
        marker = self.plain[0, -1].to(context.device, context.dtype)
        return [row for index, kind in enumerate(cond_or_uncond) if kind == 0
                for row in range(index * chunk, (index + 1) * chunk) if torch.equal(context[row, -1], marker)]

    def __call__(self, n, context, value, extra_options):
        """ComfyUI's attn2 patch: (n, context, value) before ``to_k(context)`` and ``to_v(value)``."""
        rows = self.rows(context, extra_options.get("cond_or_uncond"))
        if not rows:
            return n, context, value
        layer = int(extra_options["transformer_index"])
        if layer >= self.num_layers:
            raise BadInput(f"the model has more cross-attention layers than the stc concept ({self.num_layers})")
        sigmas = extra_options["sigmas"]
        keys, values, _ = self.step(sigmas[rows[0]] if sigmas.numel() > 1 else sigmas.reshape(-1)[0],
                                    extra_options.get("sample_sigmas"))
        context, value = context.clone(), (value if value is not None else context).clone()
        index = torch.tensor(rows, device=context.device)
        context[index] = keys[layer].to(context.device, context.dtype)
        value[index] = values[layer].to(value.device, value.dtype)
        return n, context, value

    def wrapper(self, apply_model, args):
        """ComfyUI's UNet function wrapper: the pooled embedding of this prompt's rows in ``y``."""
        c = dict(args["c"])
        context, y = c.get("c_crossattn"), c.get("y")
        rows = self.rows(context, args.get("cond_or_uncond")) if context is not None and y is not None else []
        if rows:
            _, _, pooled = self.step(args["timestep"][rows[0]])
            y = y.clone()
            y[torch.tensor(rows, device=y.device), : pooled.shape[-1]] = pooled.to(y.device, y.dtype)
            c["y"] = y
        args = {**args, "c": c}
        if self.previous_wrapper is not None:
            return self.previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)


def slots_for(concepts, placeholder_ids, num_encoders: int) -> dict:
    """token id -> ConceptSlot for each concept (its placeholder ids are the same in every tokenizer)."""
    slots = {}
    for concept in concepts:
        ids = list(placeholder_ids[concept.token])
        slot = ConceptSlot.of([ids] * num_encoders, concept.mapper, concept.rank)
        slots[slot.token_id] = slot
    return slots


def placeholders(concepts, first_free: int) -> dict:
    """Each concept's placeholder ids: one per vector, past every tokenizer's vocabulary."""
    ids, next_id = {}, first_free
    for concept in concepts:
        count = concept.mapper.config.num_vectors
        ids[concept.token] = list(range(next_id, next_id + count))
        next_id += count
    return ids


# --------------------------------------------------------------------------- ComfyUI's CLIP as stc reads it


class _Float32Embedding:
    """ComfyUI's token embedding as ComfyUI's CLIP runs it: fp32 rows from its (often fp16) weights."""

    def __init__(self, embedding):
        self.module, self.num_embeddings = embedding, embedding.num_embeddings

    def __call__(self, input_ids):
        try:
            return self.module(input_ids, out_dtype=torch.float32)
        except TypeError:  # a plain torch Embedding
            return self.module(input_ids).float()


class _ComfyEmbeddings:
    def __init__(self, embeddings):
        self.token_embedding = _Float32Embedding(embeddings.token_embedding)
        self.position_embedding = embeddings.position_embedding

    def __call__(self, inputs_embeds):
        positions = self.position_embedding.weight[: inputs_embeds.shape[1]]
        return inputs_embeds + positions.to(inputs_embeds.device, inputs_embeds.dtype)


class _ComfyEncoder:
    """ComfyUI's CLIPEncoder called as transformers' (``last_hidden_state``), with its causal mask
    and attention; each layer gets a copy of its input (ComfyUI's layers add in place)."""

    def __init__(self, encoder, num_layers=None):
        self.module = encoder
        self._layers = encoder.layers[:num_layers] if num_layers else encoder.layers  # SD 2.x: 23 of 24

    @property
    def layers(self):
        return self._layers

    @layers.setter
    def layers(self, layers):
        self._layers = layers

    def __call__(self, inputs_embeds, attention_mask=None, is_causal=True):
        from comfy.ldm.modules.attention import optimized_attention_for_device

        state = inputs_embeds
        length = state.shape[1]
        mask = torch.full((length, length), -torch.finfo(state.dtype).max, dtype=state.dtype,
                          device=state.device).triu_(1)
        attention = optimized_attention_for_device(state.device, mask=True, small_input=True)
        for layer in self._layers:
            state = layer(state.clone(), mask, attention)
        return types.SimpleNamespace(last_hidden_state=state)


class ComfyTextModel:
    """One ComfyUI CLIP text model (``SDClipModel``) as stc's encoding reads a transformers one."""

    def __init__(self, clip_model, num_layers=None):
        model = clip_model.transformer.text_model
        if num_layers and len(model.encoder.layers) < num_layers:
            raise BadInput(f"this CLIP's text encoder has {len(model.encoder.layers)} layers; the concept's family "
                           f"reads {num_layers}")
        self.text_model = types.SimpleNamespace(
            embeddings=_ComfyEmbeddings(model.embeddings), encoder=_ComfyEncoder(model.encoder, num_layers),
            final_layer_norm=model.final_layer_norm, eos_token_id=model.eos_token_id, comfy=True,
        )
        self.text_projection = getattr(clip_model.transformer, "text_projection", None)
        self.width = model.final_layer_norm.weight.shape[0]


_stc_causal_mask = causal_mask


def causal_mask(transformer, hidden):  # stc's, except for ComfyUI's encoder, which builds its own
    return None if getattr(transformer, "comfy", False) else _stc_causal_mask(transformer, hidden)


def comfy_text_models(clip) -> list:
    """A ComfyUI CLIP's text models (``SDClipModel``) in context order, and its tokenizers."""
    models = [module for module in clip.cond_stage_model.children() if hasattr(module, "transformer")
              and hasattr(getattr(module.transformer, "text_model", None), "final_layer_norm")]
    tokenizers = [value for value in vars(clip.tokenizer).values() if hasattr(value, "tokenizer")
                  and hasattr(value, "end_token")]
    if not models or len(models) != len(tokenizers):
        raise BadInput("this CLIP is not a CLIP text encoder stc's concepts know (SD 1.x, SD 2.x, SDXL)")
    return models, tokenizers


def spatial_transformers(model) -> int | None:
    """How many cross-attention layers (SpatialTransformers) a ComfyUI model's UNet has."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        return None
    return sum(1 for module in diffusion_model.modules() if type(module).__name__ == "SpatialTransformer")


def apply_concepts(model, clip, concepts, text: str):
    """A clone of ``model`` patched for ``text`` with ``concepts``, and the prompt's CONDITIONING."""
    models, tokenizers = comfy_text_models(clip)
    if hasattr(clip, "load_model"):
        clip.load_model()
    counts = concepts[0].metadata.get("text_encoder_layers") or [None] * len(models)
    if len(counts) != len(models):
        raise BadInput(f"{concepts[0].token} is a {concepts[0].label} concept ({len(counts)} text encoders); this "
                       f"CLIP has {len(models)}")
    comfy_models = [ComfyTextModel(module, count) for module, count in zip(models, counts)]
    num_layers = spatial_transformers(model)
    check_concepts(concepts, [module.width for module in comfy_models], num_layers)
    num_layers = len(concepts[0].layer_names)
    readings = concepts[0].readings
    first_free = max(module.text_model.embeddings.token_embedding.num_embeddings for module in comfy_models)
    ids_of = placeholders(concepts, first_free)
    missing = [concept.token for concept in concepts if concept.token not in text]
    if missing:
        LOG.warning("stc: %s not in the prompt %r; it has no effect", ", ".join(missing), text)
    input_ids = [prompt_ids(tokenizer, text, concepts, ids_of) for tokenizer in tokenizers]
    encoders = [TextEncoder(module, reading.context, reading.pooled, tokenizer.end_token if reading.pooled else None)
                for module, reading, tokenizer in zip(comfy_models, readings, tokenizers)]
    device = comfy_models[0].text_model.final_layer_norm.weight.device
    input_ids = [ids.to(device) for ids in input_ids]
    slots = slots_for(concepts, ids_of, len(encoders))
    for slot in slots.values():
        slot.mapper.to(device)
    sampling = model.get_model_object("model_sampling")
    patch = SpaceTimePatch(encoders, input_ids, slots, num_layers, sampling.timestep, plain=None)
    patch.encode([500.0])  # the CONDITIONING's own tensor: the mean over layers at t = 500
    keys, _, pooled = patch.cache[500.0]
    patch.plain = keys.mean(dim=0, keepdim=True).float().cpu()
    patch.plain_pooled = pooled.unsqueeze(0).float().cpu() if pooled is not None else None
    patched = model.clone()
    patched.set_model_attn2_patch(patch)
    if patch.plain_pooled is not None:
        patch.previous_wrapper = patched.model_options.get("model_function_wrapper")
        patched.set_model_unet_function_wrapper(patch.wrapper)
    extra = {"pooled_output": patch.plain_pooled} if patch.plain_pooled is not None else {}
    return patched, [[patch.plain, extra]]


# --------------------------------------------------------------------------- the nodes

CONCEPT_FOLDER = "stc_concepts"


def _concept_folders() -> str:
    import folder_paths

    if CONCEPT_FOLDER not in folder_paths.folder_names_and_paths:
        path = str(Path(folder_paths.models_dir) / CONCEPT_FOLDER)
        folder_paths.folder_names_and_paths[CONCEPT_FOLDER] = ([path], {".safetensors"})
    return CONCEPT_FOLDER


class STCLoadConcept:
    """Loads one stc concept file (models/stc_concepts) at a rank; chain several."""

    CATEGORY = "stc"
    RETURN_TYPES = ("STC_CONCEPTS",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "concept": (folder_paths.get_filename_list(_concept_folders()),),
            "rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                             "tooltip": "0: the file's default (full); 1 is coarsest and most editable"}),
        }, "optional": {"concepts": ("STC_CONCEPTS",)}}

    def load(self, concept, rank, concepts=None):
        import folder_paths

        path = folder_paths.get_full_path(_concept_folders(), concept)
        if path is None:
            raise BadInput(f"stc concept file {concept} not found in models/{CONCEPT_FOLDER}")
        loaded = LoadedConcept(path, rank)
        earlier = list(concepts or [])
        if any(other.token == loaded.token for other in earlier):
            raise BadInput(f"{loaded.token} is loaded twice")
        return (earlier + [loaded],)


class STCTextEncode:
    """Encodes a prompt naming stc concepts (<mydog>): a patched MODEL and the CONDITIONING to sample with."""

    CATEGORY = "stc"
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "concepts": ("STC_CONCEPTS",),
                             "text": ("STRING", {"multiline": True, "dynamicPrompts": True})}}

    def encode(self, model, clip, concepts, text):
        try:
            return apply_concepts(model, clip, concepts, text)
        except BadInput as exc:
            LOG.error("stc: %s", exc)
            raise


NODE_CLASS_MAPPINGS = {"STCLoadConcept": STCLoadConcept, "STCTextEncode": STCTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"STCLoadConcept": "stc Load Concept", "STCTextEncode": "stc Text Encode (concepts)"}
