"""The single-file concept format (stc-concept-file/1): one .safetensors a host loads without stc."""

import json

import pytest
import torch
from helpers import invoke, save_concept
from safetensors.torch import load, save

from stc.errors import BadInput
from stc.exchange.concept_file import FILE_FORMAT, header_metadata, read_concept_file
from stc.exchange.registry import FORMATS, reader_of
from stc.models.backbones import backbone_for_widths
from stc.store.registry import Registry


def export_file(name, out, *args):
    result = invoke("export", name, "--format", "concept-file", "--out", out, *args)
    assert result.exit_code == 0, result.output
    return out / f"{name}.safetensors"


def test_export_then_import_gives_back_the_concept_bit_exact(tmp_path):
    cat = save_concept("cat", seed=3)
    path = export_file("cat", tmp_path, "--rank", "4")
    metadata = header_metadata(path)
    assert metadata["format"] == FILE_FORMAT and metadata["token"] == "<cat>" and metadata["initializer"] == "cat"
    assert json.loads(metadata["rank"]) == 4
    assert metadata["family"] == backbone_for_widths(cat.encoder_widths).name
    assert json.loads(metadata["layer_names"]) == cat.layer_names
    assert json.loads(metadata["mapper"]) == cat.mapper
    result = invoke("import", path, "--name", "cat2")
    assert result.exit_code == 0, result.output
    back = Registry().load("cat2")
    original, imported = load(cat.weights_path.read_bytes()), load(back.weights_path.read_bytes())
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[key], imported[key]) for key in original)  # bit-exact, not close
    assert (back.mapper, back.layer_names, back.initializer, back.base_model, back.steps_done) == (
        cat.mapper, cat.layer_names, cat.initializer, cat.base_model, cat.steps_done)
    assert back.training.source_format == "stc-concept-file"


def test_the_concept_file_and_a_ti_file_are_told_apart_by_the_header(tmp_path):
    save_concept("cat")
    path = export_file("cat", tmp_path)
    assert reader_of(path) is FORMATS["concept-file"]
    ti = tmp_path / "ti.safetensors"
    ti.write_bytes(save({"emb_params": torch.zeros(1, 32)}))
    assert reader_of(ti) is FORMATS["ti"]
    plain = tmp_path / "mapper.safetensors"  # a concept's own weights file is not a concept file
    plain.write_bytes(Registry().load("cat").weights_path.read_bytes())
    assert reader_of(plain) is FORMATS["ti"]


@pytest.mark.parametrize("how, fragment", [
    ("other-format", "is not an stc concept file"),
    ("newer-format", "upgrade stc"),
    ("missing-key", "lacks layer_names"),
    ("bad-json", "'mapper' is not valid JSON"),
    ("wrong-shapes", "does not fit its mapper config"),
])
def test_a_damaged_file_is_refused_with_one_line(tmp_path, how, fragment):
    save_concept("cat")
    path = export_file("cat", tmp_path)
    metadata = header_metadata(path)
    tensors = load(path.read_bytes())
    if how == "other-format":
        metadata["format"] = "something"
    elif how == "newer-format":
        metadata["format"] = "stc-concept-file/2"
    elif how == "missing-key":
        del metadata["layer_names"]
    elif how == "bad-json":
        metadata["mapper"] = "{not json"
    elif how == "wrong-shapes":
        metadata["mapper"] = json.dumps({**json.loads(metadata["mapper"]), "hidden_dim": 64})
    path.write_bytes(save(tensors, metadata=metadata))
    if how == "other-format":
        with pytest.raises(BadInput, match=fragment):
            read_concept_file(path)
        return
    result = invoke("import", path, "--name", "dog")
    assert result.exit_code == 1 and fragment in result.stderr, result.output
    assert "Traceback" not in result.output


def test_the_header_says_how_many_layers_each_family_reads_of_its_text_encoders():
    """ComfyUI keeps all 24 layers of SD 2.x's OpenCLIP and reads the penultimate; stc's (diffusers')
    SD 2.x encoder has 23 and reads the final state: a host runs the first 23 (docs/comfyui.md)."""
    from stc.exchange.concept_file import encoder_layers
    from stc.models.backbones import SD1, SD2, SDXL

    assert [encoder_layers(family) for family in (SD1, SD2, SDXL)] == [[12], [23], [12, 32]]
