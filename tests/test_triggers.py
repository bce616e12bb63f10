"""Concept names in other tools: the A1111 webui triggers a textual-inversion file by its file name,
ComfyUI by ``embedding:<file name>``, kohya by the file name numbered for extra vectors (``w1`` of
2 vectors: ``w1``, ``w11``), diffusers by the token it is given (an a1111 file's ``name`` when none,
refused when already in the vocabulary). stc warns at train, import and export when a name is a
word of the base model's vocabulary or can meet another concept's name in kohya's numbering.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import invoke
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stc.exchange.ti import kohya_tokens, numbered_clashes
from stc.models.tiny import WORDS
from stc.models.vocabulary import is_vocabulary_word


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Warning:")]


def import_ti(tmp_path, name: str, count: int = 1, sdxl: bool = False) -> None:
    """A textual-inversion concept ``name`` of ``count`` vectors (its exports are its own vectors: no fit)."""
    generator = torch.Generator().manual_seed(count)
    if sdxl:
        tensors = {"clip_l": torch.randn(count, 32, generator=generator),
                   "clip_g": torch.randn(count, 48, generator=generator)}
    else:
        tensors = {"emb_params": torch.randn(count, 32, generator=generator)}
    path = tmp_path / f"source-{name}.safetensors"
    save_file(tensors, str(path))
    model = "builtin:tiny-sdxl" if sdxl else "builtin:tiny"
    result = invoke("import", path, "--name", name, "--model", model)
    assert result.exit_code == 0, result.output
    return result


def test_kohya_numbers_extra_vectors_after_the_file_name():
    # kohya's scripts: [token_string] + [f"{token_string}{i+1}" for i in range(num_vectors_per_token - 1)]
    assert kohya_tokens("w1", 1) == ["w1"]
    assert kohya_tokens("w1", 2) == ["w1", "w11"]
    assert kohya_tokens("w", 12)[-2:] == ["w10", "w11"]
    # "w1" meets "w" (w's 2nd vector) and "w11" (w1's 2nd vector); the others never do
    assert numbered_clashes("w1", ["w1", "w", "w11", "w1x", "ww1", "w01", "w1-2"]) == ["w", "w11"]
    assert numbered_clashes("mydog", ["mydog2", "mydogs", "dog"]) == ["mydog2"]


def test_a_vocabulary_word_is_one_token_or_a_vocabulary_entry(tiny):
    tokenizers = tiny.backbone.tokenizers(tiny.pipeline)
    assert "dog" in WORDS and "cat" in WORDS  # builtin:tiny's tokenizer has them as single tokens
    assert is_vocabulary_word("dog", tokenizers) and is_vocabulary_word("cat", tokenizers)
    assert not is_vocabulary_word("mydog", tokenizers) and not is_vocabulary_word("dog-sks", tokenizers)
    # an entry of the vocabulary that is no whole word (a merge): diffusers' check refuses it as a token
    entries = [token for token in tokenizers[0].get_vocab() if token.isalpha() and len(token) > 2
               and token + "</w>" not in tokenizers[0].get_vocab()]
    assert entries and is_vocabulary_word(entries[0], tokenizers)


def test_import_warns_for_a_vocabulary_word_and_says_how_tools_trigger_it(tmp_path):
    result = import_ti(tmp_path, "dog")
    (warning,) = warnings_of(result)
    assert "'dog' is a word of builtin:tiny's vocabulary" in warning
    assert "A1111 webui every 'dog' in a prompt" in warning and "embedding:dog" in warning
    assert "token='<dog>'" in warning and "stc mv dog dog-sks" in warning
    assert warnings_of(import_ti(tmp_path, "mydog")) == []


def test_export_warns_for_a_vocabulary_word_and_notes_every_trigger(tmp_path):
    import_ti(tmp_path, "dog")
    result = invoke("export", "dog", "--format", "a1111", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert any("'dog' is a word of builtin:tiny's vocabulary" in line for line in warnings_of(result))
    assert ("A1111 webui 'dog', ComfyUI 'embedding:dog', kohya 'dog'; diffusers: "
            "load_textual_inversion(..., token='<dog>') gives '<dog>'") in result.stderr

    import_ti(tmp_path, "sks", count=3)
    result = invoke("export", "sks", "--format", "ti", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == []
    assert "kohya 'sks sks1 sks2'; diffusers: load_textual_inversion(..., token='<sks>') gives '<sks> <sks>_1 " \
           "<sks>_2'" in result.stderr


def test_diffusers_refuses_an_a1111_file_named_by_a_vocabulary_word_as_the_warning_says(tmp_path, tiny):
    """The claim in the warning, checked against diffusers itself: its a1111 token is the name."""
    import_ti(tmp_path, "dog")
    assert invoke("export", "dog", "--format", "a1111", "--out", tmp_path).exit_code == 0
    from stc.exchange.torchfiles import read_torch_file

    embedding = read_torch_file(tmp_path / "dog.pt")
    assert embedding["name"] == "dog"
    vocabulary_entry = next(token for token in tiny.pipeline.tokenizer.get_vocab() if token.isalpha()
                            and len(token) > 2 and token + "</w>" not in tiny.pipeline.tokenizer.get_vocab())
    pipe = copy.deepcopy(tiny.pipeline)
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
        pipe.load_textual_inversion({**embedding, "name": vocabulary_entry})
    pipe.load_textual_inversion(embedding, token="<dog>")  # the warning's way out
    assert pipe.tokenizer.convert_tokens_to_ids("<dog>") == len(pipe.tokenizer) - 1


def test_export_warns_when_kohyas_numbering_meets_another_concepts_name(tmp_path):
    import_ti(tmp_path, "w1", count=2)
    import_ti(tmp_path, "w11")
    result = invoke("export", "w1", "--format", "ti", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    (warning,) = warnings_of(result)
    assert "('w1' of 2: w1, w11)" in warning and "'w11' in the registry" in warning and "stc mv" in warning
    result = invoke("export", "w11", "--format", "ti", "--out", tmp_path)
    assert "'w1' in the registry" in " ".join(warnings_of(result))
    import_ti(tmp_path, "x7", count=2)
    assert warnings_of(invoke("export", "x7", "--format", "ti", "--out", tmp_path)) == []


def test_train_warns_for_a_vocabulary_word(tmp_path, photos):
    result = invoke("train", photos, "--name", "cat", "--init", "cat", "--model", "builtin:tiny", "--steps", 1,
                    "--batch-size", 1, "--grad-accum", 1, "--save-every", 0, "--resolution", 32)
    assert result.exit_code == 0, result.output
    assert "'cat' is a word of builtin:tiny's vocabulary" in result.stderr
    assert "Warning:" in result.stderr


def test_sdxl_ti_and_a1111_are_one_file_at_one_path_and_help_says_so(tmp_path):
    help_text = " ".join(invoke("export", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "SDXL concepts: ti and a1111 write the same file, NAME.safetensors (clip_l + clip_g), at the same path" \
        in help_text
    import_ti(tmp_path, "pupxl", count=2, sdxl=True)
    result = invoke("export", "pupxl", "--format", "ti", "--out", tmp_path / "ti")
    assert result.exit_code == 0, result.output
    result = invoke("export", "pupxl", "--format", "a1111", "--out", tmp_path / "a1111")
    assert result.exit_code == 0, result.output
    assert "for SDXL, a1111 and ti are the same file: pupxl.safetensors" in result.stderr
    # the same tensors and header (not compared as bytes: safetensors writes metadata in hash-map order)
    files = [tmp_path / folder / "pupxl.safetensors" for folder in ("ti", "a1111")]
    tensors = [load_file(path) for path in files]
    assert set(tensors[0]) == set(tensors[1]) == {"clip_l", "clip_g"}
    assert all(torch.equal(tensors[0][key], tensors[1][key]) for key in tensors[0])
    headers = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            headers.append(handle.metadata())
    assert headers[0] == headers[1]
    result = invoke("export", "pupxl", "--format", "a1111", "--out", tmp_path / "ti")  # where ti wrote it
    assert result.exit_code == 1 and "pupxl.safetensors" in result.stderr and "--force" in result.stderr


def test_the_vocabulary_comes_from_local_files_only_or_not_at_all(tmp_path, tiny, monkeypatch):
    from stc.models.vocabulary import load_tokenizers

    folder = tmp_path / "model"
    tiny.pipeline.tokenizer.save_pretrained(folder / "tokenizer")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")  # only its name matters here: the vocabulary comes from --model-config
    hub = tmp_path / "hub"
    snapshot = hub / "models--org--model" / "snapshots" / ("0" * 40)
    tiny.pipeline.tokenizer.save_pretrained(snapshot / "tokenizer")
    (hub / "models--org--model" / "refs").mkdir()
    (hub / "models--org--model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    sources = ((str(folder), None), (str(single), str(folder)), ("org/model", None), ("builtin:shapes", None))
    for spec, config in sources:
        found = load_tokenizers(spec, config)
        assert len(found) == 1 and is_vocabulary_word("dog", found), spec
    # nothing to read: no tokenizer (transformers would build an empty one that calls every letter a word)
    assert load_tokenizers("org/never-downloaded") == [] and load_tokenizers(str(single)) == []
    assert load_tokenizers(str(tmp_path / "missing")) == []
