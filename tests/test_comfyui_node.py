"""stc's ComfyUI nodes without ComfyUI: the attention patch, called exactly as ComfyUI calls it
(``fn(n, context, value, extra_options)`` before ``to_k``/``to_v`` of every cross-attention), gives
every (t, layer) the keys and values stc's own encoding gives, on each family's builtin."""

import importlib.util
import json
import sys
import types

import pytest
import torch
from helpers import assert_close_in_scale

from stc.exchange.concept_file import file_bytes
from stc.hosts import comfyui
from stc.method.encoding import ConceptSlot, encode_schedule
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.method.placeholders import add_placeholder_tokens, placeholder_tokens
from stc.method.spacetime import cross_attention_layer_names
from stc.models.backbones import backbone_for_widths
from stc.store.concept import Concept

SPECS = ("builtin:tiny", "builtin:tiny-sd2", "builtin:tiny-sdxl")
TIMESTEPS = [999.0, 761.5, 500.0, 120.25, 1.0]  # ComfyUI's timesteps are floats (model_sampling.timestep)
SIGMA_PER_T = 0.01  # the fake model_sampling: t = sigma / SIGMA_PER_T
# keys and values from the node and from stc run the same code on the same weights; only the
# batch the rows are encoded in differs (the node adds the final sigma 0), which may reorder
# sums inside a matmul: rounding at float32's 1e-7 relative, far below this
REL = 1e-5


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """stc_nodes.py as `stc comfyui install` writes it, imported from its file."""
    path = tmp_path_factory.mktemp("pack") / "stc_nodes.py"
    path.write_text(comfyui.node_module_source(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("stc_nodes_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bases():
    from stc.models.base import load_base_model

    return {spec: load_base_model(spec, device="cpu") for spec in SPECS}


def concept_file(tmp_path, base, name: str, seed: int):
    """A random concept of ``base``'s family written as a single file; returns its path and mapper."""
    widths = [encoder.module.config.hidden_size for encoder in base.backbone.text_encoders(base.pipeline)]
    config = MapperConfig.for_encoders(widths, [0.4 + 0.1 * index for index in range(len(widths))])
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(seed)).eval().requires_grad_(False)
    concept = Concept(name=name, base_model=base.spec, initializer="cat", text_width=config.text_width,
                      layer_names=cross_attention_layer_names(base.pipeline.unet), mapper=config.to_dict())
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(file_bytes(concept, mapper.state_dict(), backbone_for_widths(widths)))
    return path, mapper


class FakeComfyTokenizer:
    """ComfyUI's SDTokenizer as the node reads it: a transformers tokenizer, start, end, pad tokens."""

    def __init__(self, tokenizer):
        self.tokenizer, self.max_length = tokenizer, 77
        self.start_token, self.end_token = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_token = tokenizer.pad_token_id


def stc_reference(base, concepts, prompt, timesteps):
    """stc's own keys, values and pooled embeddings of ``prompt`` at every (t, l), as stc gen encodes."""
    encoders = base.backbone.text_encoders(base.pipeline)
    tokenizers = base.backbone.tokenizers(base.pipeline)
    token_ids = {}
    for name, _, _ in concepts:
        ids = [add_placeholder_tokens(tokenizer, placeholder_tokens(f"<{name}>")) for tokenizer in tokenizers]
        token_ids[name] = ids
    slots = {}
    for name, mapper, rank in concepts:
        slot = ConceptSlot.of(token_ids[name], mapper, rank)
        slots[slot.token_id] = slot
    input_ids = [tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                 for tokenizer in tokenizers]
    keys, values, pooled = encode_schedule(encoders, input_ids, torch.tensor(timesteps), len(
        cross_attention_layer_names(base.pipeline.unet)), slots)
    return keys, values, pooled, input_ids, tokenizers


def node_patch(nodes, base, loaded, prompt, tokenizers):
    """The node's SpaceTimePatch over the builtin's text encoders (ComfyUI's are read through the
    same stitched functions, tests/test_comfyui_real.py), tokenized by the node's own rule."""
    readings = loaded[0].readings
    encoders = [nodes.TextEncoder(getattr(base.pipeline, reading.component), reading.context, reading.pooled,
                                  getattr(base.pipeline, reading.tokenizer).eos_token_id if reading.pooled else None)
                for reading in readings]
    nodes.check_concepts(loaded, [encoder.module.config.hidden_size for encoder in encoders],
                         len(cross_attention_layer_names(base.pipeline.unet)))
    first_free = max(encoder.module.get_input_embeddings().num_embeddings for encoder in encoders)
    ids_of = nodes.placeholders(loaded, first_free)
    input_ids = [nodes.prompt_ids(FakeComfyTokenizer(tokenizer), prompt, loaded, ids_of) for tokenizer in tokenizers]
    slots = nodes.slots_for(loaded, ids_of, len(encoders))
    patch = nodes.SpaceTimePatch(encoders, input_ids, slots, len(loaded[0].layer_names),
                                 lambda sigma: float(sigma) / SIGMA_PER_T, plain=None)
    patch.encode([500.0])
    keys, _, pooled = patch.cache[500.0]
    patch.plain = keys.mean(dim=0, keepdim=True)
    patch.plain_pooled = pooled.unsqueeze(0) if pooled is not None else None
    return patch, input_ids


def same_ids_but_placeholders(node_ids, stc_ids):
    """The node's tokens are stc's, a placeholder's id aside (the node's lies past the vocabulary)."""
    for ours, theirs in zip(node_ids, stc_ids):
        vocabulary_end = min(int(ours.max()), int(theirs.max()))
        assert ((ours >= vocabulary_end) == (theirs >= vocabulary_end)).all()
        plain = ours < vocabulary_end
        assert torch.equal(ours[plain], theirs[plain])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("order", [[1, 0], [0, 1]])
def test_the_patch_gives_every_t_and_layer_stcs_keys_and_values(nodes, bases, tmp_path, spec, order):
    base = bases[spec]
    cat_path, cat = concept_file(tmp_path, base, "cat", seed=1)
    dog_path, dog = concept_file(tmp_path, base, "dog", seed=2)
    loaded = [nodes.LoadedConcept(cat_path, rank=5), nodes.LoadedConcept(dog_path, rank=0)]  # 0: the file's (full)
    prompt = "a photo of <cat> beside <dog> on the moon"
    keys, values, pooled, stc_ids, tokenizers = stc_reference(base, [("cat", cat, 5), ("dog", dog, None)], prompt,
                                                              TIMESTEPS)
    patch, node_ids = node_patch(nodes, base, loaded, prompt, tokenizers)
    same_ids_but_placeholders(node_ids, stc_ids)
    layers = keys.shape[1]
    sample_sigmas = torch.tensor([t * SIGMA_PER_T for t in TIMESTEPS] + [0.0])
    chunk = 2
    uncond = torch.randn(chunk, *patch.plain.shape[1:], generator=torch.Generator().manual_seed(0))
    cond = patch.plain.expand(chunk, -1, -1)
    context = torch.cat([cond if kind == 0 else uncond for kind in order])
    for step, t in enumerate(TIMESTEPS):
        for layer in range(layers):
            extra_options = {"transformer_index": layer, "block_index": 0, "cond_or_uncond": order,
                             "sigmas": torch.full((2 * chunk,), t * SIGMA_PER_T), "sample_sigmas": sample_sigmas}
            n = torch.randn(2 * chunk, 4, 8)
            out_n, out_keys, out_values = patch(n, context, context, extra_options)
            assert out_n is n
            for index, kind in enumerate(order):
                rows = slice(index * chunk, (index + 1) * chunk)
                if kind == 1:  # the unconditional branch is untouched, bit for bit
                    assert torch.equal(out_keys[rows], uncond) and torch.equal(out_values[rows], uncond)
                    continue
                for row in range(index * chunk, (index + 1) * chunk):
                    assert_close_in_scale(out_keys[row], keys[step, layer], REL)
                    assert_close_in_scale(out_values[row], values[step, layer], REL)
    assert not torch.equal(keys[0, 0], values[0, 0])  # the bypass is there: keys and values differ
    assert len(patch.cache) == len(set(TIMESTEPS) | {500.0, 0.0})  # each timestep encoded once, cached
    if pooled is None:
        assert patch.plain_pooled is None
        return
    # SDXL: the pooled embedding (mean over layers) reaches the UNet through y, conditional rows only
    width = pooled.shape[-1]
    y = torch.randn(2 * chunk, width + 7)
    for step, t in enumerate(TIMESTEPS):
        seen = {}
        patch.wrapper(lambda x, timestep, seen=seen, **c: seen.update(c), {
            "input": torch.zeros(2 * chunk, 4, 8, 8), "timestep": torch.full((2 * chunk,), t * SIGMA_PER_T),
            "c": {"c_crossattn": context, "y": y}, "cond_or_uncond": order})
        for index, kind in enumerate(order):
            rows = slice(index * chunk, (index + 1) * chunk)
            assert torch.equal(seen["y"][rows, width:], y[rows, width:])  # the size embeddings untouched
            if kind == 1:
                assert torch.equal(seen["y"][rows], y[rows])
            else:
                for row in range(index * chunk, (index + 1) * chunk):
                    assert_close_in_scale(seen["y"][row, :width], pooled[step], REL)


def test_rows_of_another_prompt_are_left_alone_and_an_earlier_wrapper_is_called(nodes, bases, tmp_path):
    base = bases["builtin:tiny-sdxl"]
    path, mapper = concept_file(tmp_path, base, "cat", seed=1)
    loaded = [nodes.LoadedConcept(path)]
    tokenizers = base.backbone.tokenizers(base.pipeline)
    patch, _ = node_patch(nodes, base, loaded, "<cat> in snow", tokenizers)
    other = torch.randn(2, *patch.plain.shape[1:])  # a conditional chunk of another prompt
    options = {"transformer_index": 3, "cond_or_uncond": [0], "sigmas": torch.full((2,), 5.0)}
    _, keys, values = patch(None, other, other, options)
    assert keys is other and values is other
    same = patch.plain.expand(2, -1, -1)  # this very prompt, but as the unconditional chunk: untouched
    _, keys, values = patch(None, same, same, {**options, "cond_or_uncond": [1]})
    assert keys is same and values is same
    calls = []
    patch.previous_wrapper = lambda apply_model, args: calls.append(args) or "earlier"
    args = {"input": None, "timestep": torch.full((2,), 5.0), "c": {"c_crossattn": other, "y": torch.zeros(2, 9)},
            "cond_or_uncond": [0]}
    assert patch.wrapper(None, args) == "earlier"
    assert len(calls) == 1


def test_clear_errors_for_another_family_a_bad_rank_and_a_missing_file(nodes, bases, tmp_path):
    path, _ = concept_file(tmp_path, bases["builtin:tiny-sdxl"], "cat", seed=1)
    loaded = nodes.LoadedConcept(path)
    with pytest.raises(nodes.BadInput, match=r"<cat> is a SDXL concept \(text encoders 32\+48 wide\); this CLIP's "
                                             r"are 32"):
        nodes.check_concepts([loaded], [32], 11)
    with pytest.raises(nodes.BadInput, match="11 cross-attention layers"):
        nodes.check_concepts([loaded], [32, 48], 16)
    with pytest.raises(nodes.BadInput, match=r"<cat> has ranks 1\.\.128; rank 129 is outside them"):
        nodes.LoadedConcept(path, rank=129)
    with pytest.raises(nodes.BadInput, match="does not exist"):
        nodes.LoadedConcept(tmp_path / "missing.safetensors")
    ti = tmp_path / "ti.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, 32)}, str(ti))
    with pytest.raises(nodes.BadInput, match="is not an stc concept file"):
        nodes.LoadedConcept(ti)


def test_the_node_reads_the_family_from_the_file_not_the_code(nodes, bases, tmp_path):
    path, _ = concept_file(tmp_path, bases["builtin:tiny-sdxl"], "cat", seed=1)
    loaded = nodes.LoadedConcept(path)
    assert [(r.context, r.pooled) for r in loaded.readings] == [("penultimate", False), ("penultimate", True)]
    assert len(loaded.layer_names) == 11 and json.loads(json.dumps(loaded.layer_names)) == loaded.layer_names


def test_the_pack_stitches_public_functions_and_fails_when_one_is_renamed_or_imports_stc(monkeypatch):
    import importlib
    import inspect

    import stc.method.encoding as encoding

    for module_name, names in comfyui.STITCHED:
        module = importlib.import_module(module_name)
        for name in names:
            assert hasattr(module, name) and not name.startswith("_"), f"{module_name}.{name}"
    source = "def spacetime_rows(timesteps, num_layers):\n    from stc.errors import BadInput\n    return BadInput\n"
    namespace = {}
    exec(compile(source, encoding.__file__, "exec"), namespace)
    real_getsource = inspect.getsource
    monkeypatch.setattr(encoding, "spacetime_rows", namespace["spacetime_rows"])
    monkeypatch.setattr(inspect, "getsource",
                        lambda value: source if value is namespace["spacetime_rows"] else real_getsource(value))
    with pytest.raises(RuntimeError, match="stc_nodes.py would import from stc"):
        comfyui.node_module_source()
    monkeypatch.delattr(encoding, "spacetime_rows")  # renamed away
    with pytest.raises(AttributeError, match="spacetime_rows"):
        comfyui.node_module_source()


def test_install_writes_the_pack_and_the_concept_folder(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "models").mkdir()
    pack, concepts = comfyui.install(comfy)
    assert sorted(p.name for p in pack.iterdir()) == ["__init__.py", "stc_nodes.py"] and concepts.is_dir()
    blocked = types.ModuleType("stc")  # the pack imports without stc
    assert "import stc" not in (pack / "stc_nodes.py").read_text() and blocked


def test_the_command_installs_the_nodes_and_exports_concepts(tmp_path):
    from helpers import assert_one_line_error, invoke, save_concept

    from stc.exchange.concept_file import header_metadata

    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "models").mkdir()
    save_concept("cat")
    result = invoke("comfyui", comfy, "--concept", "cat")
    assert result.exit_code == 0, result.output
    written = result.stdout.split()
    concept_file_path = comfy / "models" / "stc_concepts" / "cat.safetensors"
    assert written == [str(comfy / "custom_nodes" / "stc_neti"), str(concept_file_path)]
    assert header_metadata(comfy / "models" / "stc_concepts" / "cat.safetensors")["token"] == "<cat>"
    assert_one_line_error(invoke("comfyui", tmp_path, "--concept", "cat"), "is not a ComfyUI folder")
    assert_one_line_error(invoke("comfyui", comfy, "--concept", "nope"), "nope")


def test_the_example_workflow_wires_the_nodes_as_they_declare_themselves(nodes):
    from pathlib import Path

    workflow = json.loads((Path(__file__).parent.parent / "examples/comfyui/stc_concept_sd15.json").read_text())
    by_id = {node["id"]: node for node in workflow["nodes"]}
    stock = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"}
    assert {node["type"] for node in workflow["nodes"]} <= stock | set(nodes.NODE_CLASS_MAPPINGS)
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert by_id[source]["outputs"][source_slot]["type"] == kind and link_id in by_id[source]["outputs"][
            source_slot]["links"]
        assert by_id[target]["inputs"][target_slot]["link"] == link_id
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        node = next(node for node in workflow["nodes"] if node["type"] == name)
        assert [output["type"] for output in node["outputs"]] == list(cls.RETURN_TYPES)
        required = cls.INPUT_TYPES.__func__(cls)["required"] if name != "STCLoadConcept" else {
            "concept": None, "rank": None}
        linked = {entry["name"] for entry in node.get("inputs", [])}
        widgets = [key for key in required if key not in linked]
        assert len(node["widgets_values"]) == len(widgets), (name, widgets)
