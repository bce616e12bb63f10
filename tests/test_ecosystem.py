"""Files the other tools write and read: each checked against the rule the consumer applies,
written out here (not by calling stc's own reader), and what stc makes of their files."""

import collections
import io
import json
import pickle
import re
import zipfile

import pytest
import torch
from helpers import assert_one_line_error, invoke, save_concept
from safetensors.torch import save_file

from stc.method.spacetime import cross_attention_layer_names
from stc.store.registry import Registry

# --------------------------------------------------------------------------- the A1111 webui's loader

# stable-diffusion-webui, modules/safe.py (the revision after PR #5327, which every later one
# extends only by 'byteorder' and '.data/serialization_id'): the zip members a .pt may have ...
WEBUI_ALLOWED_MEMBER = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
WEBUI_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
# ... and the globals its RestrictedUnpickler.find_class lets the pickle name
WEBUI_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", name) for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                   "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}


class WebuiUnpickler(pickle.Unpickler):
    """modules/safe.py's RestrictedUnpickler: storages are empty stand-ins, globals from the list."""

    named: list

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        self.named.append((module, name))
        if (module, name) not in WEBUI_ALLOWED_GLOBALS:
            raise Exception(f"global '{module}/{name}' is forbidden")
        return {"OrderedDict": collections.OrderedDict, "set": set}.get(name) or getattr(
            __import__(module, fromlist=[name]), name)


def webui_check_pt(data: bytes) -> list:
    """modules/safe.py's check_pt on a zip .pt: every member allowed, exactly one data.pkl, which
    unpickles with the restricted unpickler. Returns the globals it named."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            if not WEBUI_ALLOWED_MEMBER.match(name):
                raise Exception(f"bad file inside the file: {name}")
        pickles = [name for name in archive.namelist() if WEBUI_DATA_PKL.match(name)]
        assert len(pickles) == 1, pickles
        unpickler = WebuiUnpickler(io.BytesIO(archive.read(pickles[0])))
        unpickler.named = []
        unpickler.load()
        return unpickler.named


def test_the_rule_written_out_refuses_what_plain_torch_save_writes(tmp_path):
    """The check above is the webui's: torch.save of today's torch fails it, as the webui's own does."""
    written = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}}, written)
    with pytest.raises(Exception, match=r"bad file inside .*\.format_version"):
        webui_check_pt(written.getvalue())
    pickled_code = io.BytesIO()
    with zipfile.ZipFile(pickled_code, "w") as archive:
        archive.writestr("x/data.pkl", pickle.dumps(print))
    with pytest.raises(Exception, match="forbidden"):
        webui_check_pt(pickled_code.getvalue())


def test_an_a1111_export_passes_the_webui_safe_loader_and_loads_weights_only(tmp_path, tiny):
    save_concept("mydog", seed=2, layer_names=cross_attention_layer_names(tiny.pipeline.unet))
    result = invoke("export", "mydog", "--format", "a1111", "--out", tmp_path, "--vectors", 2,
                    "--samples", 8, "--fit-steps", 2)
    assert result.exit_code == 0, result.output
    data = (tmp_path / "mydog.pt").read_bytes()
    named = webui_check_pt(data)
    assert set(named) <= WEBUI_ALLOWED_GLOBALS and ("torch._utils", "_rebuild_tensor_v2") in named
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert {name.split("/")[0] for name in archive.namelist()} == {"mydog"}  # named after the concept
    embedding = torch.load(tmp_path / "mydog.pt", weights_only=True)  # ComfyUI's and diffusers' way
    assert embedding["string_to_param"]["*"].shape == (2, 32) and embedding["string_to_token"] == {"*": 265}
    assert torch.load(tmp_path / "mydog.pt", weights_only=True, mmap=True)["name"] == "mydog"  # storages aligned
    again = invoke("export", "mydog", "--format", "a1111", "--out", tmp_path / "b", "--vectors", 2,
                   "--samples", 8, "--fit-steps", 2)
    assert again.exit_code == 0 and (tmp_path / "b" / "mydog.pt").read_bytes() == data  # deterministic


def test_neti_exports_pass_the_same_loader(tmp_path):
    from test_exchange import sd_concept

    sd_concept("wide")
    assert invoke("export", "wide", "--format", "neti", "--out", tmp_path).exit_code == 0
    data = (tmp_path / "wide-learned_embeds.bin").read_bytes()
    assert set(webui_check_pt(data)) <= WEBUI_ALLOWED_GLOBALS
    with zipfile.ZipFile(tmp_path / "wide-mapper.pt") as archive:
        assert all(WEBUI_ALLOWED_MEMBER.match(name) for name in archive.namelist())


# --------------------------------------------------------------------------- what other tools write


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_the_original_textual_inversion_layout_imports(tmp_path, zip_format):
    """What the webui's Embedding.save wrote under older torch (a ParameterDict; the legacy
    format before torch 1.6), and kohya's train_textual_inversion still reads."""
    vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(3))
    data = {"string_to_token": {"*": 265},
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vector.clone())}),
            "name": "old", "step": 500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "someone/sd15-finetune"}
    torch.save(data, tmp_path / "old.pt", _use_new_zipfile_serialization=zip_format)
    result = invoke("import", tmp_path / "old.pt")
    assert result.exit_code == 0, result.output
    concept = Registry().load("old")
    assert concept.base_model == "someone/sd15-finetune"  # sd_checkpoint_name names it (768 alone: SD 1.5)
    from stc.store.conceptio import read_state_dict

    assert torch.equal(read_state_dict(concept)["output_layer.0.bias"], vector[0])


def test_a_diffusers_learned_embeds_file_is_named_after_its_token(tmp_path):
    for index, token in enumerate(("<cat-toy>", "<dog-toy>")):
        folder = tmp_path / str(index)
        folder.mkdir()
        torch.save({token: torch.randn(32)}, folder / "learned_embeds.bin")  # diffusers' textual_inversion.py
        result = invoke("import", folder / "learned_embeds.bin")
        assert result.exit_code == 0, result.output
    assert Registry().names() == ["cat-toy", "dog-toy"]


@pytest.mark.parametrize("width, expected", [
    (32, "builtin:tiny"), (48, "builtin:tiny-sd2"), (64, "builtin:shapes"),
    (768, "stable-diffusion-v1-5/stable-diffusion-v1-5"), (1024, "stabilityai/stable-diffusion-2-1"),
])
def test_an_embedding_naming_no_model_gets_the_one_its_width_fits(tmp_path, width, expected):
    save_file({"emb_params": torch.randn(1, width)}, tmp_path / "e.safetensors")
    result = invoke("import", tmp_path / "e.safetensors")
    assert result.exit_code == 0, result.output
    assert Registry().load("e").base_model == expected
    assert "could not be read" not in result.stderr


def test_the_default_model_wins_when_its_width_fits_and_no_fit_is_an_error(tmp_path, monkeypatch):
    save_file({"emb_params": torch.randn(1, 48)}, tmp_path / "fits.safetensors")
    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "other.safetensors")
    monkeypatch.setenv("STC_MODEL", "builtin:tiny-sd2")
    assert invoke("import", tmp_path / "fits.safetensors").exit_code == 0
    assert invoke("import", tmp_path / "other.safetensors").exit_code == 0
    assert Registry().load("fits").base_model == "builtin:tiny-sd2"
    assert Registry().load("other").base_model == "builtin:tiny"  # the default is 48 wide: the 32-wide builtin
    save_file({"emb_params": torch.randn(1, 100)}, tmp_path / "odd.safetensors")
    assert_one_line_error(invoke("import", tmp_path / "odd.safetensors"), "100-wide", "Pass --model")
    assert "odd" not in Registry().names()


def test_a_textual_inversion_concept_has_no_ranks(tmp_path, tiny):
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "flat.safetensors")
    assert invoke("import", tmp_path / "flat.safetensors").exit_code == 0
    listing = json.loads(invoke("ls", "--json").stdout)
    assert [record["rank_max"] for record in listing] == [None]
    assert "rank max" in invoke("ls").stdout and " - " in invoke("ls").stdout.splitlines()[1]
    result = invoke("gen", "<flat> on the moon", "--steps", 1, "--rank", 8, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["flat-on-the-moon-s0.png"]  # no -r8
    assert_one_line_error(invoke("gen", "<flat:8> on the moon"), "flat has no ranks", "<flat:8>")
    assert_one_line_error(invoke("inspect", "flat", "--rank", 4), "flat has no ranks")
    assert "no ranks" in invoke("inspect", "flat").stdout


def test_export_force_replaces_only_an_exports_own_files(tmp_path):
    save_concept("pup", layer_names=[f"l{i}" for i in range(16)])
    folder = tmp_path / "pup"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = invoke("export", "pup", "--format", "diffusers", "--out", tmp_path, "--force")
    assert_one_line_error(result, "notes.txt", "replaces only")
    assert (folder / "notes.txt").read_text() == "mine" and [p.name for p in folder.iterdir()] == ["notes.txt"]
    (folder / "notes.txt").unlink()
    assert invoke("export", "pup", "--format", "diffusers", "--out", tmp_path, "--force").exit_code == 0
    assert invoke("export", "pup", "--format", "diffusers", "--out", tmp_path, "--force").exit_code == 0
