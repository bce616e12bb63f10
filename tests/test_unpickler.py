"""The restricted unpickler (stc/exchange/torchfiles.py): its exact allow-list, and hand-built
hostile pickles that each try another way to run code (getattr, __reduce__ chains,
functools.partial, os.system, subprocess, eval through builtins, nested GLOBAL and STACK_GLOBAL
opcodes, INST and OBJ). Every one must be refused with a clear error naming what it wanted, and
a marker file proves that nothing ran. A control shows each payload does run under plain pickle.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, invoke

from stc.exchange import torchfiles
from stc.exchange.neti import REFERENCE_CLASSES, read_reference_mapper
from stc.exchange.torchfiles import ALLOWED_GLOBALS, UnsafeCheckpoint, read_torch_file

# Written out, not computed: adding any global (builtins.getattr is the usual first step of a
# pickle escape) must be a deliberate change of this list.
EXPECTED_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"), ("torch.nn.modules.container", "ParameterDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "dict"), ("__builtin__", "list"),
    ("__builtin__", "tuple"),
    ("torch", "FloatStorage"), ("torch", "DoubleStorage"), ("torch", "HalfStorage"), ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"), ("torch", "IntStorage"), ("torch", "ShortStorage"), ("torch", "CharStorage"),
    ("torch", "ByteStorage"), ("torch", "BoolStorage"), ("torch", "ComplexFloatStorage"),
    ("torch", "ComplexDoubleStorage"), ("torch", "UntypedStorage"),
}
EXPECTED_REFERENCE = {("models.positional_encoding", "NeTIPositionalEncoding"),
                      ("models.positional_encoding", "BasicEncoder")}


def test_the_allow_list_is_exactly_the_written_one():
    assert set(ALLOWED_GLOBALS) == EXPECTED_ALLOWED
    assert set(REFERENCE_CLASSES) == EXPECTED_REFERENCE
    # what they resolve to: inert containers and tensor rebuilders, never a builtin that reaches code
    assert ALLOWED_GLOBALS[("builtins", "dict")] is dict
    assert ALLOWED_GLOBALS[("collections", "OrderedDict")] is OrderedDict
    for value in ALLOWED_GLOBALS.values():
        assert value not in (getattr, eval, exec, open, __import__, compile, setattr, globals, vars)
        assert getattr(value, "__module__", "") in ("builtins", "collections", torchfiles.__name__), value


# --------------------------------------------------------------------------- hostile pickles


def _text(value: str) -> bytes:
    """A protocol-0 unicode string opcode (V...\\n)."""
    return b"V" + value.encode() + b"\n"


def _short(value: str) -> bytes:
    """A protocol-4 SHORT_BINUNICODE opcode."""
    raw = value.encode()
    return b"\x8c" + struct.pack("<B", len(raw)) + raw


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """label -> (pickle bytes that would create ``marker`` when unpickled, the global it names first)."""
    touch = f"touch {marker}"
    python = f"open({str(marker)!r}, 'w').write('ran')"
    call = lambda module, name, arg: b"c" + module.encode() + b"\n" + name.encode() + b"\n(" + _text(arg) + b"tR"  # noqa: E731
    return {
        "os.system": (call("os", "system", touch) + b".", "os.system"),
        "posix.system": (call("posix", "system", touch) + b".", "posix.system"),
        "subprocess.getoutput": (call("subprocess", "getoutput", touch) + b".", "subprocess.getoutput"),
        "subprocess.Popen": (b"csubprocess\nPopen\n((" + _text("touch") + _text(str(marker)) + b"ltR.",
                             "subprocess.Popen"),
        "builtins.eval": (call("builtins", "eval", python) + b".", "builtins.eval"),
        "builtins.exec": (call("builtins", "exec", python) + b".", "builtins.exec"),
        "__builtin__.eval": (call("__builtin__", "eval", python) + b".", "__builtin__.eval"),
        # getattr(__import__('os'), 'system')('touch …')
        "builtins.getattr": (b"cbuiltins\ngetattr\n(" + call("builtins", "__import__", "os") + _text("system")
                             + b"tR(" + _text(touch) + b"tR.", "builtins.getattr"),
        # functools.partial(os.system, 'touch …')()
        "functools.partial": (b"cfunctools\npartial\n(cos\nsystem\n" + _text(touch) + b"tR)R.", "functools.partial"),
        # protocol 4: STACK_GLOBAL instead of GLOBAL
        "STACK_GLOBAL eval": (b"\x80\x04" + _short("builtins") + _short("eval") + b"\x93" + _short(python)
                              + b"\x85R.", "builtins.eval"),
        # a dotted name reaching through an allowed function to its module's globals
        "dotted STACK_GLOBAL": (b"\x80\x04" + _short("torch._utils") + _short("_rebuild_tensor_v2.__globals__")
                                + b"\x93.", "torch._utils._rebuild_tensor_v2.__globals__"),
        # nested: the call hides as a value inside allowed containers
        "GLOBAL nested in a dict": (b"cbuiltins\ndict\n)RVstring_to_param\n}Vx\n" + call("os", "system", touch)
                                    + b"ss.", "os.system"),
        "STACK_GLOBAL nested in a list": (b"\x80\x04]" + _short("ok") + b"a" + _short("os") + _short("system")
                                          + b"\x93" + _short(touch) + b"\x85Ra.", "os.system"),
        # INST: mark, args, then 'i module\nname\n' calls module.name(*args)
        "INST": (b"(" + _text(touch) + b"ios\nsystem\n.", "os.system"),
        # OBJ: mark, class, args, then 'o'
        "OBJ": (b"(cos\nsystem\n" + _text(touch) + b"o.", "os.system"),
        # NEWOBJ on a class that is not allowed
        "NEWOBJ": (b"\x80\x02csubprocess\nPopen\n(" + _text(touch) + b"t\x81.", "subprocess.Popen"),
    }


class _Chain:
    """A __reduce__ chain: an allowed container whose contents reduce to os.system."""

    def __init__(self, inner):
        self.inner = inner

    def __reduce__(self):
        return (OrderedDict, ([("weights", self.inner)],))


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _reduce_chain(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _Chain(_Chain(_System(f"touch {marker}")))}, protocol=2)


def _all_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    return {**_payloads(marker), "__reduce__ chain": (_reduce_chain(marker), f"{os.system.__module__}.system")}


def _zip_file(pickled: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    return out.getvalue()


def _legacy_file(pickled: bytes) -> bytes:
    head = b"".join(pickle.dumps(part, protocol=2) for part in (torchfiles.LEGACY_MAGIC, torchfiles.LEGACY_PROTOCOL,
                                                                 {"protocol_version": 1001}))
    return head + pickled + pickle.dumps([], protocol=2)


@pytest.mark.parametrize("label", sorted(_all_payloads(Path("m"))))
def test_the_payload_runs_under_plain_pickle(tmp_path, label):
    """Control: each payload is live, so its refusal below is what keeps the marker from appearing."""
    marker = tmp_path / "ran"
    pickled, _ = _all_payloads(marker)[label]
    if label == "dotted STACK_GLOBAL":  # reaches torch._utils' globals: a dict, the door to everything
        assert isinstance(pickle.loads(pickled), dict)
        return
    if label == "NEWOBJ":  # creates a Popen without __init__: refused by the class it names, not by effect
        assert type(pickle.loads(pickled)) is subprocess.Popen
        return
    result = pickle.loads(pickled)
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists(), label


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("label", sorted(_all_payloads(Path("m"))))
def test_a_hostile_pickle_is_refused_naming_its_global_and_runs_nothing(tmp_path, label, layout):
    marker = tmp_path / "ran"
    pickled, named = _all_payloads(marker)[label]
    path = tmp_path / f"{layout}.pt"
    path.write_bytes(_zip_file(pickled) if layout == "zip" else _legacy_file(pickled))
    for extra in (None, REFERENCE_CLASSES):  # the generic reader and the reference format's
        with pytest.raises(UnsafeCheckpoint) as info:
            read_torch_file(path, extra)
        message = str(info.value)
        assert f"wants to run {named} when loaded" in message and "refused" in message and "\n" not in message
        assert not marker.exists(), f"{label} ran"
    with pytest.raises(UnsafeCheckpoint):
        read_reference_mapper(path)
    assert not marker.exists()


@pytest.mark.parametrize("label", ["builtins.getattr", "functools.partial", "INST", "__reduce__ chain"])
def test_the_cli_refuses_a_hostile_pickle_in_one_line(tmp_path, label):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(_zip_file(_all_payloads(marker)[label][0]))
    result = invoke("import", path, "--name", "evil", "--model", "builtin:tiny")
    assert_one_line_error(result, "refused")
    assert not marker.exists()


def test_state_built_onto_an_allowed_global_does_not_outlive_its_file(tmp_path):
    """BUILD ('b') sets state on the object below it: on an allowed global that object is shared by
    every later read. A file that tries to retype FloatStorage or rewrite a rebuilder's defaults
    is refused or changes only its own copy; the next honest file reads the same tensors."""
    rebuilders = [ALLOWED_GLOBALS[("torch._utils", name)] for name in ("_rebuild_tensor_v2", "_rebuild_parameter")]
    defaults = [function.__defaults__ for function in rebuilders]
    honest = tmp_path / "honest.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, honest)
    attacks = [
        b"ctorch\nFloatStorage\n(dVdtype\nVx\nsb.",  # the instance's __dict__
        b"ctorch\nFloatStorage\nN}Vdtype\nVx\ns\x86b.",  # setattr via slot state
        b"ctorch._utils\n_rebuild_tensor_v2\nN}V__defaults__\n)s\x86b.",
        b"ctorch._utils\n_rebuild_parameter\nN}V__defaults__\n)s\x86b.",
    ]
    for index, attack in enumerate(attacks):
        path = tmp_path / f"attack{index}.pt"
        path.write_bytes(_zip_file(attack))
        try:
            read_torch_file(path)
        except torchfiles.BadCheckpoint:
            pass
        assert ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype is torch.float32
        assert [function.__defaults__ for function in rebuilders] == defaults, index
        read = read_torch_file(honest)["w"]
        assert read.dtype is torch.float32 and read.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], index
