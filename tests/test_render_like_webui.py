"""Rendering as A1111/ComfyUI users render (issue 28): random seeds, concepts in the negative
prompt, re-rendering from a PNG's parameters, prompt weighting, img2img, LoRAs."""

import json

import numpy as np
from helpers import invoke
from PIL import Image

TINY = ("--model", "builtin:tiny", "--steps", 2)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- --seed -1


def test_seed_minus_one_draws_a_seed_prints_and_records_it(tmp_path):
    drawn = invoke("gen", "a cat", *TINY, "--seed", -1, "--json", "--out", tmp_path / "a")
    assert drawn.exit_code == 0, drawn.output
    record = json.loads(drawn.stdout)
    seed = record["seed"]
    assert seed >= 0 and f"Seed: {seed}" in drawn.stderr
    assert f"Seed: {seed}" in Image.open(record["path"]).text["parameters"]
    again = invoke("gen", "a cat", *TINY, "--seed", seed, "--json", "--out", tmp_path / "b")
    assert np.array_equal(pixels(record["path"]), pixels(json.loads(again.stdout)["path"]))
    other = invoke("gen", "a cat", *TINY, "--seed", -1, "--json", "--out", tmp_path / "c")
    assert json.loads(other.stdout)["seed"] != seed  # 1 in 2**32 to draw the same one
