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


def single_file(family: str = "sd15") -> Path:
    """A random-weight single file of the SD 1.5 (``sd15``) or SD 2.x (``sd2``, stc's shipped configs)
    architecture, written in the original (LDM) layout, fp16."""
    path = CACHE / f"{family}-random.safetensors"
    if path.is_file():
        return path
    from ldm_writer import pipeline_to_ldm, randomise
    from safetensors.torch import save_file

    from benchmarks.models import build_sd15_pipeline

    CACHE.mkdir(parents=True, exist_ok=True)
    pipeline = build_sd15_pipeline() if family == "sd15" else _sd2_pipeline()
    state = pipeline_to_ldm(randomise(pipeline, seed=15))
    if family == "sd2":  # a real SD 2.x file holds all 24 OpenCLIP layers; stc's (diffusers') encoder reads 23
        last = "cond_stage_model.model.transformer.resblocks.22."
        generator = torch.Generator().manual_seed(24)
        state.update({key.replace(".22.", ".23."): value * (1 + 0.2 * torch.randn(value.shape, generator=generator))
                      for key, value in list(state.items()) if key.startswith(last)})
    save_file({key: value.half() for key, value in state.items()}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return path


def _sd2_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stc.models.backbones import SD2
    from stc.models.tiny import build_tiny_tokenizer

    folder = SD2.config_dir
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_tiny_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def probe(request, tmp_path_factory):
    from stc.exchange.concept_file import file_bytes
    from stc.hosts.comfyui import pack_files
    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.models.backbones import SD1, SD2
    from stc.store.concept import Concept

    family = {"sd15": SD1, "sd2": SD2}[request.param]
    checkpoint = single_file(request.param)
    work = tmp_path_factory.mktemp("comfy")
    pack = work / "pack"
    pack.mkdir()
    for name, text in pack_files().items():
        (pack / name).write_text(text, encoding="utf-8")
    config = MapperConfig.for_encoders(family.widths, [0.38])  # about the norm of a word embedding
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(5)).eval().requires_grad_(False)
    concept = Concept(name="cat", base_model=str(checkpoint), initializer="cat", text_width=family.text_width,
                      layer_names=list(family.layer_names), mapper=config.to_dict())
    concept_path = work / "cat.safetensors"
    concept_path.write_bytes(file_bytes(concept, mapper.state_dict(), family))
    out = work / "probe.pt"
    here = Path(__file__).parent
    subprocess.run([PYTHON, str(here / "comfyui_probe.py"), COMFYUI, str(checkpoint), str(pack), str(concept_path),
                    str(out)], check=True, cwd=COMFYUI, env={**os.environ, "PYTHONPATH": ""})
    return torch.load(out, weights_only=False), mapper, checkpoint, request.param


def test_every_cross_attention_reads_stcs_keys_and_values(probe):
    from stc.method.encoding import ConceptSlot, encode_schedule
    from stc.method.placeholders import add_placeholder_tokens
    from stc.models.base import load_base_model

    data, mapper, checkpoint, family = probe
    base = load_base_model(str(checkpoint), device="cpu", config=str(Path(COMFYUI) / "comfy" / "sd1_tokenizer"))
    encoders = base.backbone.text_encoders(base.pipeline)
    ids = data["input_ids"]
    placeholder = data["placeholder"]
    # the node tokenizes with ComfyUI's tokenizer as stc tokenizes (its vocabulary, the placeholder added)
    tokenizer = base.pipeline.tokenizer
    stc_id = add_placeholder_tokens(tokenizer, ["<cat>"])[0]
    stc_ids = tokenizer(data["prompt"], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
    stc_ids = torch.where(stc_ids == stc_id, placeholder, stc_ids)
    if family == "sd2":  # SD 2.x pads with "!" (0), as ComfyUI's SD 2.x tokenizer; sd1_tokenizer's pad is the end
        stc_ids = torch.where((stc_ids == tokenizer.eos_token_id) & (torch.arange(77) > int(
            (stc_ids == tokenizer.eos_token_id).int().argmax())), torch.zeros_like(stc_ids), stc_ids)
    assert torch.equal(ids, stc_ids)
    sigmas = sorted(data["timesteps"])
    timesteps = torch.tensor([data["timesteps"][sigma] for sigma in sigmas])
    slots = {placeholder: ConceptSlot(placeholder, mapper)}
    keys, values, _ = encode_schedule(encoders, [ids], timesteps, len(base.backbone.layer_names), slots)  # K L S D
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
    assert layers_seen == set(range(keys.shape[1])) and cond_rows >= keys.shape[1] * len(sigmas)
    assert worst["keys"] <= REL and worst["values"] <= REL, worst
    assert not torch.equal(keys, values)
    figures = {"max_relative_error": worst, "cross_attention_calls": len(data["records"]), "timesteps": sigmas and
               [round(float(t), 4) for t in timesteps], "comfy_unet_dtype": data["comfy_dtype"]}
    (CACHE / f"figures-{family}.json").write_text(json.dumps(figures, indent=2) + "\n")


def test_the_node_changes_the_latents_and_nothing_else(probe):
    data = probe[0]
    assert torch.equal(data["with_identity"], data["stock"])  # an identity patch: ComfyUI's output bit for bit
    assert torch.equal(data["patched_other"], data["stock_other"])  # another prompt: the patch lets it be
    assert torch.equal(data["with_concept"], data["again"])  # deterministic
    assert not torch.equal(data["with_concept"], data["stock"])  # the concept changes the latents
