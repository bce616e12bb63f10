from stc.models.tiny import WORDS, build_tiny_tokenizer


def test_tokenizer_really_tokenizes_words_as_single_tokens():
    tokenizer = build_tiny_tokenizer()
    for word in ("object", "cat", "dog", "painting", "photo", "moon"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1, word
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{word}</w>"]
    ids = tokenizer("A photo of a cat on the Moon").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat on the moon"


def test_unknown_words_split_into_byte_pieces_and_round_trip():
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.encode("hippopotamus", add_special_tokens=False)
    assert len(ids) > 1
    assert tokenizer.decode(ids) == "hippopotamus"
    assert tokenizer.unk_token_id not in ids


def test_every_listed_word_is_one_token():
    tokenizer = build_tiny_tokenizer()
    for word in {w for w in WORDS if w.isalpha()}:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word


def test_tiny_pipeline_has_sd1_topology(tiny):
    from stc.method.spacetime import cross_attention_layer_names

    pipe = tiny.pipeline
    assert len(pipe.unet.down_blocks) == 4 and len(pipe.unet.up_blocks) == 4
    assert len(cross_attention_layer_names(pipe.unet)) == 16
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert tiny.default_resolution == 64


def test_tiny_pipeline_is_deterministic():
    from stc.models.tiny import build_tiny_pipeline

    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    for module in ("unet", "vae", "text_encoder"):
        a = getattr(first, module).state_dict()
        b = getattr(second, module).state_dict()
        assert all((a[key] == b[key]).all() for key in a), module
