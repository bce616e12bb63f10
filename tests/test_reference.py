"""Reading reference NeTI checkpoints without running their pickles, and reproducing the
reference's own outputs from them (fixtures in tests/data, described in its README)."""

import json
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import encode_spacetime

from stc.errors import BadInput, StcError
from stc.exchange.neti import (
    ReferenceCheckpoint,
    UnsupportedReference,
    mapper_from_reference,
    read_learned_embeds,
    read_reference_mapper,
    reference_mapper_config,
)
from stc.exchange.torchfiles import BadCheckpoint, UnsafeCheckpoint, read_torch_file
from stc.method.encoding import ConceptSlot
from stc.method.mapper import truncate

DATA = Path(__file__).parent / "data"
SAMPLE_MAPPER = DATA / "neti-sample-mapper.pt"
ENCODER_MAPPER = DATA / "neti-sample-encoder-mapper.pt"
NUM_LAYERS = 16

# Largest error seen against the reference: mapper outputs ~1e-7 (norms) and ~3e-8 (vectors);
# text-encoder sequences ~1.7e-6, up to 2.2e-6 with other CPU kernels (values of order 1-3 after
# the final LayerNorm). The reference ran on another machine and torch: its numbers are another
# code path, so the sequences get ~3e-6 of their scale (4x the worst seen); a wrong bypass rule
# or layer moves them by more than 1e-2.
MAPPER_ATOL = 1e-6
ENCODER_ATOL = 1e-5


def _close(actual: torch.Tensor, expected: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def sample() -> ReferenceCheckpoint:
    return read_reference_mapper(SAMPLE_MAPPER)


@pytest.fixture(scope="module")
def sample_outputs():
    return np.load(DATA / "neti-sample-outputs.npz")


# --------------------------------------------------------------------------- the sample mapper


def test_sample_mapper_reads_as_the_reference_layout(sample):
    assert sample.encoder["kind"] == "positional"
    assert sample.encoder["w"].shape == (1024, 2)
    assert "encoder.w" not in sample.state_dict  # the CUDA form: w only in the pickled encoder
    assert torch.equal(sample.state_dict["input_layer.weight"], sample.state_dict["net.0.weight"])
    assert sample.placeholder_token == "<ref>" and sample.super_category_token == "object"
    config = reference_mapper_config(sample)
    assert (config.text_width, config.norm_scale, config.hidden_dim) == (768, 0.3868, 128)
    assert (config.num_layers, config.num_time_anchors, config.num_fourier_features) == (16, 10, 1024)
    assert (config.sigma_t, config.sigma_l, config.bypass, config.nested_dropout) == (0.03, 2.0, True, True)


def test_reading_never_calls_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be used on reference checkpoints")

    monkeypatch.setattr(torch, "load", refuse)
    assert read_reference_mapper(SAMPLE_MAPPER).state_dict["net.1.weight"].shape == (128, 160)


def test_sample_mapper_reproduces_the_reference_at_every_timestep_layer_and_rank(sample, sample_outputs):
    """The reference's ``mapper(t, l, truncation_idx=r)`` is stc's ``mapper(t, l, rank=r)``.

    The 15 sample points go through ``mapper(t, l, rank=r)``; the full 1000 x 16 grid goes through
    the same steps with the hidden vectors computed once (8 forward passes would take seconds).
    """
    mapper = mapper_from_reference(sample)
    ranks = [int(rank) for rank in sample_outputs["ranks"]]
    assert ranks[-1] == 128  # 128 = no truncation
    timesteps = torch.arange(1000, dtype=torch.float32).repeat_interleave(NUM_LAYERS)
    layers = torch.arange(NUM_LAYERS, dtype=torch.float32).repeat(1000)
    sample_t = torch.from_numpy(sample_outputs["sample_t"]).float()
    sample_l = torch.from_numpy(sample_outputs["sample_l"]).float()
    with torch.no_grad():
        hidden = mapper.hidden(timesteps, layers)
        for index, rank in enumerate(ranks):
            _close(mapper(sample_t, sample_l, rank=rank), sample_outputs["samples"][index], MAPPER_ATOL)
            outputs = [mapper.output(truncate(chunk, rank)) for chunk in hidden.split(800)]  # cache-sized
            outputs = torch.cat(outputs).view(1000, NUM_LAYERS, 1536)
            token_norm, bypass_norm = outputs[..., :768].norm(dim=-1), outputs[..., 768:].norm(dim=-1)
            _close(token_norm, sample_outputs["token_norm"][index], MAPPER_ATOL)
            _close(bypass_norm, sample_outputs["bypass_norm"][index], MAPPER_ATOL)
        assert torch.equal(mapper(sample_t, sample_l, rank=128), mapper(sample_t, sample_l))


def test_learned_embeds_read_to_the_placeholder_vector():
    embeds = read_learned_embeds(DATA / "neti-sample-learned_embeds.bin")
    assert list(embeds) == ["<ref>"]
    assert embeds["<ref>"].shape == (768,) and embeds["<ref>"].dtype == torch.float32
    assert torch.isfinite(embeds["<ref>"]).all() and embeds["<ref>"].norm() > 0


# --------------------------------------------------------------------------- text encoding


def _clip_text_model():
    """The fixture's CLIP text model, its transformers-4.27 key names adapted to the installed
    transformers, loaded strictly."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    config = json.loads((DATA / "neti-sample-encoder-text_encoder_config.json").read_text())
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    expected = set(model.state_dict())
    adapted = {}
    for key, value in load_file(DATA / "neti-sample-encoder-text_encoder.safetensors").items():
        names = [name for name in (key, key.removeprefix("text_model."), "text_model." + key) if name in expected]
        if not names and key.endswith("embeddings.position_ids"):  # a buffer newer releases do not save
            assert torch.equal(value.flatten(), torch.arange(value.numel()))
            continue
        adapted[names[0] if names else key] = value
    model.load_state_dict(adapted, strict=True)
    return model.requires_grad_(False)


def test_spacetime_encoding_reproduces_the_reference_keys_and_values():
    text_encoder = _clip_text_model()
    mapper = mapper_from_reference(read_reference_mapper(ENCODER_MAPPER))
    reference = np.load(DATA / "neti-sample-encoder-outputs.npz")
    input_ids = torch.from_numpy(reference["input_ids"])
    placeholder = int(reference["placeholder_id"])
    assert mapper.config.norm_scale == float(reference["target_norm"])
    timesteps = torch.from_numpy(reference["timesteps"]).repeat_interleave(3)  # (t, l) rows, time-major
    layers = torch.from_numpy(reference["layers"]).repeat(3)
    shape = reference["no_bypass"].shape[1:]
    with torch.no_grad():
        plain, same = encode_spacetime(text_encoder, input_ids, timesteps[:1], layers[:1])
        _close(plain[0], reference["plain"], ENCODER_ATOL)
        for index, rank in enumerate(reference["ranks"]):
            concepts = {placeholder: ConceptSlot(placeholder, mapper, int(rank))}
            keys, values = encode_spacetime(text_encoder, input_ids.expand(9, -1), timesteps, layers, concepts)
            _close(keys.view(shape), reference["no_bypass"][index], ENCODER_ATOL)
            _close(values.view(shape), reference["with_bypass"][index], ENCODER_ATOL)


# --------------------------------------------------------------------------- hand-made checkpoints


def _write_archive(path: Path, members: dict, prefix: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(f"{prefix}/{name}", data)
    return path


def _call_pickle(module: str, name: str, *args: str) -> bytes:
    """A protocol-2 pickle that calls ``module.name(*args)`` when loaded."""
    strings = b"".join(b"X" + struct.pack("<I", len(arg.encode())) + arg.encode() for arg in args)
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + strings + b"tR."


def test_the_hostile_payload_is_live_under_plain_pickle(tmp_path):
    """Control for the next test: the payload really does create the file when unpickled."""
    target = tmp_path / "made-by-plain-pickle"
    pickle.loads(_call_pickle("builtins", "open", str(target), "w")).close()
    assert target.exists()


@pytest.mark.parametrize(
    ("module", "name", "shown"), [("builtins", "open", "builtins.open"), ("os", "system", "os.system")]
)
def test_code_in_a_checkpoint_is_refused_before_it_runs(tmp_path, module, name, shown):
    target = tmp_path / "pwned"
    args = (str(target), "w") if name == "open" else (f"touch {target}",)
    members = {"data.pkl": _call_pickle(module, name, *args), "byteorder": "little"}
    path = _write_archive(tmp_path / "evil-mapper.pt", members)
    for read in (read_torch_file, read_reference_mapper, read_learned_embeds):
        with pytest.raises(UnsafeCheckpoint, match=f"wants to run {shown} when loaded.*refused") as caught:
            read(path)
        assert str(path) in str(caught.value)
    assert isinstance(caught.value, BadInput) and isinstance(caught.value, StcError)
    assert not target.exists()


def test_code_hidden_in_a_torch_saved_dict_is_refused(tmp_path):
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {target}",)

    path = tmp_path / "evil-mapper.pt"
    torch.save({"state_dict": {"net.1.weight": torch.zeros(2)}, "cfg": {}, "encoder": Payload()}, path)
    with pytest.raises(UnsafeCheckpoint, match=f"{os.system.__module__}.system"):
        read_reference_mapper(path)
    assert not target.exists()


def test_files_that_are_not_torch_checkpoints_get_clear_errors(tmp_path):
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))  # a pickle, but not torch.save's layout
    with pytest.raises(BadCheckpoint, match="not a torch checkpoint"):
        read_reference_mapper(plain)
    no_pickle = _write_archive(tmp_path / "no-pickle.pt", {"version": "3\n", "data/0": b"\0" * 4})
    with pytest.raises(BadCheckpoint, match="no single data.pkl"):
        read_reference_mapper(no_pickle)
    with pytest.raises(BadCheckpoint, match="cannot be read"):
        read_reference_mapper(tmp_path / "missing.pt")


def test_damaged_archives_get_clear_errors(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save({"t": torch.arange(4, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
        info = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    prefix = info.filename.split("/")[0]
    raw = bytearray(path.read_bytes())  # flip a data byte: the member's CRC no longer matches
    name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)  # local header
    raw[info.header_offset + 30 + name_length + extra_length + 1] ^= 0xFF
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(BadCheckpoint, match="damaged"):
        read_torch_file(flipped)
    short = {name.split("/", 1)[1]: data for name, data in members.items()}
    short["data/0"] = b"\0" * 8  # 2 floats where the record says 4
    with pytest.raises(BadCheckpoint, match="damaged.*holds 8 bytes"):
        read_torch_file(_write_archive(tmp_path / "short.pt", short, prefix))
    del short["data/0"]
    with pytest.raises(BadCheckpoint, match="damaged.*no .*data/0"):
        read_torch_file(_write_archive(tmp_path / "gone.pt", short, prefix))


def test_tensors_round_trip_in_every_layout(tmp_path):
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    tensors = {
        "half": base.half(), "bf16": base.bfloat16(), "long": base.long(), "bool": base > 5,
        "transposed": base.t(), "view": base[1:, 2:4], "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5),
        "parameter": torch.nn.Parameter(base.clone()),
    }
    path = tmp_path / "tensors.pt"
    torch.save({**tensors, "shared": tensors["view"]}, path)
    loaded = read_torch_file(path)
    for key, expected in tensors.items():
        assert type(loaded[key]) is torch.Tensor and loaded[key].dtype == expected.dtype, key
        assert torch.equal(loaded[key], expected.detach()), key
    assert loaded["shared"].data_ptr() == loaded["view"].data_ptr()  # one storage, as saved


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_legacy_and_zip_files_are_read_without_running_them(tmp_path, zip_format):
    """torch.save's legacy format (torch < 1.6, or _use_new_zipfile_serialization=False) is five
    pickles and raw storages: read with the same restricted unpickler, views and shared storages
    kept, nn.ParameterDict (the original textual-inversion layout) as a plain dict."""
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    saved = {"half": base.half(), "long": base.long(), "view": base[1:, 2:4], "base": base,
             "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(base[:2].clone())}), "step": 7}
    path = tmp_path / "file.pt"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    loaded = read_torch_file(path)
    for key in ("half", "long", "view", "base"):
        assert loaded[key].dtype == saved[key].dtype and torch.equal(loaded[key], saved[key]), key
    assert type(loaded["string_to_param"]) is not torch.nn.ParameterDict and isinstance(loaded["string_to_param"], dict)
    assert torch.equal(loaded["string_to_param"]["*"], base[:2]) and loaded["step"] == 7
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()

    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {target}",)

    for name, payload in (("code", Payload()), ("module", torch.nn.Linear(2, 2))):
        evil = tmp_path / f"{name}.pt"
        torch.save({"string_to_param": {"*": payload}}, evil, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(UnsafeCheckpoint, match="wants to run .* refused"):
            read_torch_file(evil)
    assert not target.exists()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BadCheckpoint, match="damaged"):
        read_torch_file(truncated)


def test_big_endian_archives_are_byte_swapped(tmp_path):
    path = tmp_path / "little.pt"
    expected = {"f": torch.linspace(-3, 3, 7), "l": torch.arange(-2, 5)}
    torch.save(expected, path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    prefix = next(iter(members)).split("/")[0]
    big = {}
    for name, data in members.items():
        short = name.split("/", 1)[1]
        if short.startswith("data/"):
            itemsize = 4 if short == "data/0" else 8  # storages in save order: f (float32), l (int64)
            data = b"".join(data[i:i + itemsize][::-1] for i in range(0, len(data), itemsize))
        big[short] = b"big" if short == "byteorder" else data
    loaded = read_torch_file(_write_archive(tmp_path / "big.pt", big, prefix))
    assert torch.equal(loaded["f"], expected["f"]) and torch.equal(loaded["l"], expected["l"])


# --------------------------------------------------------------------------- structure checks


class _Encoder:
    """Pickles like the reference's encoder modules (NEWOBJ, then BUILD with the state)."""

    def __init__(self, **state):
        self.__dict__.update(state)


@pytest.fixture
def reference_classes(monkeypatch):
    """``models.positional_encoding`` with classes of the reference's names, for torch.save."""
    module = types.ModuleType("models.positional_encoding")
    for name in ("NeTIPositionalEncoding", "BasicEncoder"):
        cls = type(name, (_Encoder,), {"__module__": module.__name__})
        setattr(module, name, cls)
    package = types.ModuleType("models")
    package.positional_encoding = module
    monkeypatch.setitem(sys.modules, "models", package)
    monkeypatch.setitem(sys.modules, "models.positional_encoding", module)
    return module


def _save(path: Path, state_dict: dict, encoder, cfg: dict | None = None) -> Path:
    torch.save({"state_dict": state_dict, "cfg": cfg if cfg is not None else {"model": {"target_norm": 0.4}},
                "encoder": encoder}, path)
    return path


def test_basic_encoder_checkpoints_are_refused_by_name(tmp_path, reference_classes, sample):
    state = {key: value for key, value in sample.state_dict.items() if not key.startswith(("input_layer.", "net.0."))}
    encoder = reference_classes.BasicEncoder(
        training=False, _parameters={}, normalized_timesteps=torch.linspace(-1, 1, 1000),
        normalized_unet_layers=torch.linspace(-1, 1, 16),
    )
    cfg = {"model": {"target_norm": 0.4, "use_positional_encoding": False}}
    ckpt = read_reference_mapper(_save(tmp_path / "basic-mapper.pt", state, encoder, cfg))
    assert ckpt.encoder["kind"] == "basic" and ckpt.encoder["w"] is None
    with pytest.raises(UnsupportedReference, match="use_positional_encoding off.*BasicEncoder"):
        mapper_from_reference(ckpt)


def test_partial_cfg_takes_the_reference_defaults(tmp_path, reference_classes, sample):
    encoder = reference_classes.NeTIPositionalEncoding(_parameters={"w": sample.encoder["w"]}, num_w=1024)
    path = _save(tmp_path / "cpu-mapper.pt", {**sample.state_dict, "encoder.w": sample.encoder["w"]}, encoder)
    config = reference_mapper_config(read_reference_mapper(path))
    assert (config.norm_scale, config.sigma_t, config.sigma_l) == (0.4, 0.03, 2.0)
    assert (config.bypass, config.nested_dropout, config.nested_dropout_prob) == (True, True, 0.5)
    assert (config.num_time_anchors, config.num_layers, config.text_width) == (10, 16, 768)


def _mutated(sample, **changes) -> dict:
    state = dict(sample.state_dict)
    state.update(changes)
    return {key: value for key, value in state.items() if value is not None}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"net.2.bias": None}, "lacks net.2.bias"),
        ({"net.3.weight": torch.zeros(1)}, "unexpected net.3.weight"),
        ({"input_layer.bias": torch.zeros(160)}, "input_layer.bias differs from net.0.bias"),
        ({"encoder.w": torch.zeros(1024, 2)}, "encoder's w differs"),
    ],
)
def test_inconsistent_mappers_get_clear_errors(tmp_path, reference_classes, sample, change, message):
    encoder = reference_classes.NeTIPositionalEncoding(w=sample.encoder["w"], sigma_t=0.03, sigma_l=2.0, num_w=1024)
    path = _save(tmp_path / "bad-mapper.pt", _mutated(sample, **change), encoder)
    with pytest.raises(BadCheckpoint, match=message):
        mapper_from_reference(read_reference_mapper(path))


def test_missing_parts_and_normalisation_get_clear_errors(tmp_path, reference_classes, sample):
    encoder = reference_classes.NeTIPositionalEncoding(w=sample.encoder["w"], num_w=1024)
    torch.save({"state_dict": sample.state_dict, "cfg": {}}, tmp_path / "no-encoder.pt")
    with pytest.raises(BadCheckpoint, match="lacks encoder"):
        read_reference_mapper(tmp_path / "no-encoder.pt")
    unnormalised = _save(tmp_path / "raw-mapper.pt", sample.state_dict, encoder, cfg={"model": {}})
    with pytest.raises(UnsupportedReference, match="target_norm is None"):
        mapper_from_reference(read_reference_mapper(unnormalised))
    with pytest.raises(BadCheckpoint, match="entry 'state_dict' that is not a named tensor"):
        read_learned_embeds(SAMPLE_MAPPER)
