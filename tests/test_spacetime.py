import torch
from helpers import assert_close_in_scale, encode_spacetime

from stc.method.encoding import ConceptSlot, encode_layers
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.method.spacetime import SpaceTimeConditioning, cross_attention_layer_names, install_processors

SD1_ORDER = [
    "down_blocks.0.attentions.0", "down_blocks.0.attentions.1",
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",
]


def _unet_inputs(tiny, batch=1):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    width = tiny.text_width
    hidden = torch.randn(batch, 77, width, generator=generator)
    return sample, hidden


def test_layer_order_is_execution_order_not_dict_order(tiny):
    unet = tiny.pipeline.unet
    names = cross_attention_layer_names(unet)
    assert [name.rsplit(".transformer_blocks", 1)[0] for name in names] == SD1_ORDER
    dict_order = [n.rsplit(".processor", 1)[0] for n in unet.attn_processors if "attn2" in n]
    assert dict_order != names and dict_order[-1].startswith("mid_block")

    executed = []
    modules = dict(unet.named_modules())
    hooks = [modules[name].register_forward_hook(lambda m, a, o, n=name: executed.append(n)) for name in names]
    sample, hidden = _unet_inputs(tiny)
    with torch.no_grad():
        unet(sample, 500, encoder_hidden_states=hidden)
    for hook in hooks:
        hook.remove()
    assert executed == names


def _distinct_conditioning(width, layers=16, batch=1):
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(layers, batch, 77, width, generator=generator)
    values = torch.randn(layers, batch, 77, width, generator=generator)
    return SpaceTimeConditioning(keys=keys, values=values)


def test_every_layer_gets_its_own_keys_and_values(tiny):
    unet = tiny.pipeline.unet
    names = install_processors(unet)
    conditioning = _distinct_conditioning(tiny.text_width)
    seen = {}
    modules = dict(unet.named_modules())
    hooks = []
    for name in names:
        for proj in ("to_k", "to_v"):
            hooks.append(modules[f"{name}.{proj}"].register_forward_hook(
                lambda m, args, o, key=(name, proj): seen.update({key: args[0].clone()})
            ))
    sample, hidden = _unet_inputs(tiny)
    with torch.no_grad():
        unet(sample, 500, encoder_hidden_states=hidden, cross_attention_kwargs={"spacetime": conditioning})
    for hook in hooks:
        hook.remove()
    for index, name in enumerate(names):
        assert torch.equal(seen[(name, "to_k")], conditioning.keys[index]), name
        assert torch.equal(seen[(name, "to_v")], conditioning.values[index]), name


def test_changing_one_layers_conditioning_changes_the_unet_output(tiny):
    unet = tiny.pipeline.unet
    install_processors(unet)
    conditioning = _distinct_conditioning(tiny.text_width)
    sample, hidden = _unet_inputs(tiny)

    def run(cond):
        with torch.no_grad():
            return unet(sample, 500, encoder_hidden_states=hidden, cross_attention_kwargs={"spacetime": cond}).sample

    reference = run(conditioning)
    assert torch.equal(reference, run(conditioning))
    generator = torch.Generator().manual_seed(7)
    for layer in range(16):
        for field in ("keys", "values"):
            tensors = {"keys": conditioning.keys.clone(), "values": conditioning.values.clone()}
            tensors[field][layer] += torch.randn(tensors[field][layer].shape, generator=generator)
            changed = run(SpaceTimeConditioning(**tensors))
            assert (changed - reference).abs().max() > 1e-4, f"layer {layer} ignored its {field}"


def test_processors_match_diffusers_attention_without_spacetime(tiny):
    unet = tiny.pipeline.unet
    sample, hidden = _unet_inputs(tiny, batch=2)
    with torch.no_grad():
        stock = unet(sample, 321, encoder_hidden_states=hidden).sample
        install_processors(unet)
        ours = unet(sample, 321, encoder_hidden_states=hidden).sample
    # diffusers' AttnProcessor2_0 vs stc's processor, the same operations: rounding relative to the
    # outputs' scale (~1), 1e-5 of it is ~80 float32 ulps; a processor that loses a term is off by O(1)
    assert_close_in_scale(ours, stock, 1e-5)


def test_plain_encoding_matches_the_text_encoder(tiny):
    pipe = tiny.pipeline
    ids = pipe.tokenizer(["a photo of a cat", "the moon"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        stock = pipe.text_encoder(ids)[0]
        plain, bypassed = encode_spacetime(pipe.text_encoder, ids, torch.zeros(2), torch.zeros(2))
    # transformers' forward vs stc's (its own causal mask and encoder call): rounding relative to the
    # states' scale (~3); 1e-5 of it is ~80 float32 ulps
    assert_close_in_scale(plain, stock, 1e-5)
    assert torch.equal(plain, bypassed)


def _concept(tiny, seed=0):
    mapper = NeTIMapper(MapperConfig(text_width=tiny.text_width, norm_scale=0.5),
                        generator=torch.Generator().manual_seed(seed))
    tokenizer = tiny.pipeline.tokenizer
    tokenizer.add_tokens(["<thing>"])
    return mapper.eval().requires_grad_(False), tokenizer.convert_tokens_to_ids("<thing>")


def test_bypass_is_added_before_the_final_layernorm_only_at_the_placeholder(tiny):
    pipe = tiny.pipeline
    mapper, token_id = _concept(tiny)
    ids = pipe.tokenizer(["a photo of a <thing> on the moon"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    position = int((ids[0] == token_id).nonzero())
    t, l = torch.tensor([700.0]), torch.tensor([4.0])
    with torch.no_grad():
        plain, bypassed = encode_spacetime(pipe.text_encoder, ids, t, l, {token_id: ConceptSlot(token_id, mapper)})
        token, bypass = mapper.split(mapper(t, l))
        # recompute by hand: token embedding replaced, encoder, then bypass before the final LN
        embeds = pipe.text_encoder.get_input_embeddings()(ids.clamp(max=token_id - 1))
        embeds[0, position] = token[0]
        hidden = pipe.text_encoder.text_model.embeddings(inputs_embeds=embeds) \
            if hasattr(pipe.text_encoder, "text_model") else pipe.text_encoder.embeddings(inputs_embeds=embeds)
    differs = (plain - bypassed).abs().amax(dim=-1)[0] > 0
    assert differs.nonzero().flatten().tolist() == [position]
    final_ln = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
    # invert: the pre-LN state at the placeholder is reachable from the no-bypass run
    with torch.no_grad():
        from stc.method.encoding import causal_mask, text_transformer

        transformer = text_transformer(pipe.text_encoder)
        state = transformer.encoder(inputs_embeds=hidden, attention_mask=causal_mask(transformer, hidden),
                                    is_causal=True).last_hidden_state
        expected_plain = final_ln(state)
        existing = state[0, position]
        # the spec's rule: the bypass rescaled to the state's norm, 0.2 x it added, then the final LN
        expected = final_ln(existing + 0.2 * bypass[0] / bypass[0].norm() * existing.norm())
    # the rule recomputed by hand (b / |b| here, F.normalize in stc): rounding relative to the states'
    # scale (~3); the bypass itself moves the placeholder's state by a sizeable part of it
    assert_close_in_scale(plain, expected_plain, 1e-5)
    assert_close_in_scale(bypassed[0, position], expected, 1e-5)


def test_schedule_encoding_is_batched_and_matches_per_layer_calls(tiny):
    pipe = tiny.pipeline
    mapper, token_id = _concept(tiny)
    ids = pipe.tokenizer(["a <thing> on the moon"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    timesteps = torch.tensor([999, 500, 20])
    calls = []
    hook = pipe.text_encoder.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    slots = {token_id: ConceptSlot(token_id, mapper)}
    with torch.no_grad():
        encoding = encode_layers(pipe.text_encoder, ids, timesteps, 16, slots)
    keys, values = encoding.keys, encoding.values
    hook.remove()
    assert len(calls) == 1  # 3 steps x 16 layers in one text-encoder call
    assert keys.shape == values.shape == (3, 16, 77, tiny.text_width)
    with torch.no_grad():
        # every (step, layer): a row order mixed up in the batch (step-major vs layer-major) shows
        for step, t in enumerate(timesteps.tolist()):
            for layer in range(16):
                plain, bypassed = encode_spacetime(
                    pipe.text_encoder, ids, torch.tensor([float(t)]), torch.tensor([float(layer)]), slots
                )
                # 48 rows in one call vs one row: other GEMM shapes, rounding relative to the states'
                # scale (~3; seen at 4e-7 of it, up to 7e-7 with other CPUs' kernels)
                assert_close_in_scale(keys[step, layer], plain[0], 1e-5)
                assert_close_in_scale(values[step, layer], bypassed[0], 1e-5)
    # (t, l) really matter: layers and steps differ
    assert not torch.allclose(keys[0, 0], keys[0, 15])
    assert not torch.allclose(keys[0, 3], keys[2, 3])


class _Recording(torch.nn.Module):
    """Calls ``mapper`` and records every call's (timesteps, layers, outputs)."""

    def __init__(self, mapper):
        super().__init__()
        self.mapper, self.calls = mapper, []

    def forward(self, timesteps, layers, **kwargs):
        outputs = self.mapper(timesteps, layers, **kwargs)
        self.calls.append((timesteps, layers, outputs))
        return outputs


def test_nested_dropout_draws_once_per_layer_of_a_training_step(tiny):
    """The reference calls the mapper once per UNet layer and step with the whole batch: one coin
    flip (p = 0.5) per call, then each sample truncates at its own k."""
    pipe = tiny.pipeline
    mapper, token_id = _concept(tiny)
    mapper.train()
    recording = _Recording(mapper)
    batch = 6
    ids = pipe.tokenizer(["a photo of a <thing>"] * batch, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    slot = ConceptSlot(token_id, recording, config=mapper.config)
    with torch.no_grad():
        encode_layers(pipe.text_encoder, ids, torch.full((batch,), 500), 16, {token_id: slot},
                      generator=torch.Generator().manual_seed(3))
    [(timesteps, layers, outputs)] = recording.calls  # all 16 layers x batch rows in one call
    with torch.no_grad():
        full = mapper.eval()(timesteps, layers)
    truncated = (outputs - full).abs().amax(dim=-1) > 1e-7  # rows
    decisions = []
    for layer in range(16):
        rows = truncated[layers == layer]
        assert bool(rows.all()) or not bool(rows.any()), f"layer {layer}: samples of one call flipped separately"
        decisions.append(bool(rows.all()))
        if rows.all():  # each sample at its own k: not all the same output
            assert len({tuple(row.round(decimals=6).tolist()) for row in outputs[layers == layer]}) > 1
    assert any(decisions) and not all(decisions), decisions  # each layer flips its own coin
