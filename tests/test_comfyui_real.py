"""stc's nodes in a real ComfyUI (runs when STC_COMFYUI=<ComfyUI checkout> is set; ComfyUI's own
Python, with its requirements installed, in STC_COMFYUI_PYTHON, default: this one).

A random-weight single file of the SD 1.5 architecture is loaded by ComfyUI's own checkpoint
loader, the node is applied, ComfyUI's sampler runs 3 steps at 64 px (tests/comfyui_probe.py,
in ComfyUI's environment, without stc), and the key and value inputs of every cross-attention
are compared with stc's encodings of the same prompt at the same timestep, from the same file
loaded by stc. Figures go to $STC_COMFYUI_CACHE/figures.json (docs/comfyui.md records them).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMFYUI = os.environ.get("STC_COMFYUI")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set STC_COMFYUI=<ComfyUI checkout> to run")
PYTHON = os.environ.get("STC_COMFYUI_PYTHON", sys.executable)
CACHE = Path(os.environ.get("STC_COMFYUI_CACHE", "/tmp/stc-comfyui"))
# stc (transformers' CLIP) and ComfyUI (its own CLIP modules, read through the node's adapter) run the
# same arithmetic in another order (other attention kernels and layer loops): fp32 rounding, ~1e-7
# relative per operation over 12 layers; the bound
REL = 1e-5


def single_file() -> Path:
    """The SD 1.5 architecture with random weights, written in the original (LDM) layout, fp16."""
    path = CACHE / "sd15-random.safetensors"
    if path.is_file():
        return path
    from ldm_writer import pipeline_to_ldm, randomise
    from safetensors.torch import save_file

    from benchmarks.models import build_sd15_pipeline

    CACHE.mkdir(parents=True, exist_ok=True)
    state = pipeline_to_ldm(randomise(build_sd15_pipeline(), seed=15))
    save_file({key: value.half() for key, value in state.items()}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return path


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    from stc.exchange.concept_file import file_bytes
    from stc.hosts.comfyui import pack_files
    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.models.backbones import SD1
    from stc.store.concept import Concept

    checkpoint = single_file()
    work = tmp_path_factory.mktemp("comfy")
    pack = work / "pack"
    pack.mkdir()
    for name, text in pack_files().items():
        (pack / name).write_text(text, encoding="utf-8")
    config = MapperConfig.for_encoders([768], [0.38])  # the norm of an SD 1.x word embedding
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(5)).eval().requires_grad_(False)
    concept = Concept(name="cat", base_model=str(checkpoint), initializer="cat", text_width=768,
                      layer_names=list(SD1.layer_names), mapper=config.to_dict())
    concept_path = work / "cat.safetensors"
    concept_path.write_bytes(file_bytes(concept, mapper.state_dict(), SD1))
    out = work / "probe.pt"
    here = Path(__file__).parent
    subprocess.run([PYTHON, str(here / "comfyui_probe.py"), COMFYUI, str(checkpoint), str(pack), str(concept_path),
                    str(out)], check=True, cwd=COMFYUI, env={**os.environ, "PYTHONPATH": ""})
    return torch.load(out, weights_only=False), mapper, checkpoint


def test_every_cross_attention_reads_stcs_keys_and_values(probe):
    from stc.method.encoding import ConceptSlot, encode_schedule
    from stc.method.placeholders import add_placeholder_tokens
    from stc.models.base import load_base_model

    data, mapper, checkpoint = probe
    base = load_base_model(str(checkpoint), device="cpu", config=str(Path(COMFYUI) / "comfy" / "sd1_tokenizer"))
    encoders = base.backbone.text_encoders(base.pipeline)
    ids = data["input_ids"]
    placeholder = data["placeholder"]
    # the node tokenizes with ComfyUI's tokenizer as stc tokenizes (its vocabulary, the placeholder added)
    tokenizer = base.pipeline.tokenizer
    stc_id = add_placeholder_tokens(tokenizer, ["<cat>"])[0]
    stc_ids = tokenizer(data["prompt"], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
    assert torch.equal(ids, torch.where(stc_ids == stc_id, placeholder, stc_ids))
    sigmas = sorted(data["timesteps"])
    timesteps = torch.tensor([data["timesteps"][sigma] for sigma in sigmas])
    slots = {placeholder: ConceptSlot(placeholder, mapper)}
    keys, values, _ = encode_schedule(encoders, [ids], timesteps, 16, slots)  # K x L x S x D
    worst = {"keys": 0.0, "values": 0.0}
    layers_seen, cond_rows = set(), 0
    for record in data["records"]:
        step = sigmas.index(record["sigma"])
        chunk = record["keys"].shape[0] // len(record["cond_or_uncond"])
        for index, kind in enumerate(record["cond_or_uncond"]):
            if kind != 0:
                continue
            for row in range(index * chunk, (index + 1) * chunk):
                cond_rows += 1
                for name, expected in (("keys", keys), ("values", values)):
                    reference = expected[step, record["layer"]].double()
                    error = float((record[name][row].double() - reference).abs().max() / reference.abs().max())
                    worst[name] = max(worst[name], error)
        layers_seen.add(record["layer"])
    assert layers_seen == set(range(16)) and cond_rows >= 16 * len(sigmas)
    assert worst["keys"] <= REL and worst["values"] <= REL, worst
    assert not torch.equal(keys, values)
    figures = {"max_relative_error": worst, "cross_attention_calls": len(data["records"]), "timesteps": sigmas and
               [round(float(t), 4) for t in timesteps], "comfy_unet_dtype": data["comfy_dtype"]}
    (CACHE / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")


def test_the_node_changes_the_latents_and_nothing_else(probe):
    data, _, _ = probe
    assert torch.equal(data["with_identity"], data["stock"])  # an identity patch: ComfyUI's output bit for bit
    assert torch.equal(data["patched_other"], data["stock_other"])  # another prompt: the patch lets it be
    assert torch.equal(data["with_concept"], data["again"])  # deterministic
    assert not torch.equal(data["with_concept"], data["stock"])  # the concept changes the latents
