import math

import pytest
import torch
from helpers import assert_close_in_scale

from stc.method.mapper import MapperConfig, NeTIMapper, truncate


def make_mapper(width=768, seed=0, **kwargs):
    return NeTIMapper(MapperConfig(text_width=width, norm_scale=0.4, **kwargs),
                      generator=torch.Generator().manual_seed(seed))


def test_parameter_count_matches_the_method():
    mapper = make_mapper()
    trainable = sum(p.numel() for p in mapper.parameters())
    # 2048->160, 160->128, LN, 128->128, LN, 128->1536
    assert trainable == (2048 * 160 + 160) + (160 * 128 + 128) + 256 + (128 * 128 + 128) + 256 + (128 * 1536 + 1536)
    assert 560_000 < trainable < 570_000
    assert mapper.encoding.w.shape == (1024, 2)
    assert "encoding.w" in mapper.state_dict()  # the frozen matrix is saved with the concept


def test_fourier_encoding_is_sin_then_cos_normalised_without_two_pi():
    mapper = make_mapper()
    w = mapper.encoding.w
    t, l = torch.tensor([500.0]), torch.tensor([7.0])
    proj = w @ torch.tensor([500.0, 7.0])
    expected = torch.cat([torch.sin(proj), torch.cos(proj)])
    expected = expected / expected.norm()
    # a matrix-vector product here, a batched matmul in the mapper: rounding of arguments up to ~80
    # (an ulp ~8e-6) over the norm 32, ~1e-5 of these ~0.03 values; sin/cos swapped or 2π are off by O(1)
    assert_close_in_scale(mapper.encoding(t, l)[0], expected, 1e-4)


def test_encoding_matrix_is_scaled_by_sigmas():
    mapper = NeTIMapper(MapperConfig(text_width=8, norm_scale=1.0), generator=torch.Generator().manual_seed(3))
    w = mapper.encoding.w
    assert 0.02 < w[:, 0].std() < 0.04  # sigma_t = 0.03
    assert 1.8 < w[:, 1].std() < 2.2  # sigma_l = 2.0


def test_input_layer_is_initialised_to_time_major_anchors():
    mapper = make_mapper()
    weight = mapper.net[0].weight
    assert weight.shape == (160, 2048)
    # row 16 * i + j is (t = 100 i, l = j)
    for row, (t, l) in {0: (0, 0), 15: (0, 15), 16: (100, 0), 159: (900, 15), 37: (200, 5)}.items():
        expected = mapper.encoding(torch.tensor([float(t)]), torch.tensor([float(l)]))[0]
        # the anchors are encoded as one 160-row batch, here as one row: rounding of the projection
        # (~1 ulp of values up to ~190) over the norm 32, at most ~5e-7 of these ~0.03 values
        assert torch.allclose(weight[row], expected, atol=5e-6)


def test_output_is_normalised_to_the_initializer_norm():
    mapper = make_mapper().eval()
    out = mapper(torch.tensor([0.0, 999.0, 480.0]), torch.tensor([0.0, 15.0, 6.0]))
    assert out.shape == (3, 1536)
    assert torch.allclose(out.norm(dim=-1), torch.full((3,), 0.4), atol=1e-5)
    token, bypass = mapper.split(out)
    assert token.shape == bypass.shape == (3, 768)
    # the whole vector is normalised, not each half
    assert not torch.allclose(token.norm(dim=-1), torch.full((3,), 0.4), atol=1e-3)


def test_no_bypass_ablation_outputs_only_the_token():
    mapper = make_mapper(width=32, bypass=False).eval()
    out = mapper(torch.tensor([10.0]), torch.tensor([1.0]))
    assert out.shape == (1, 32)
    assert mapper.split(out)[1] is None


def _captured_hidden(mapper, rank):
    captured = {}
    mapper.requires_grad_(False)
    handle = mapper.output_layer.register_forward_hook(lambda m, args, out: captured.setdefault("h", args[0]))
    mapper(torch.tensor([100.0, 900.0]), torch.tensor([3.0, 12.0]), rank=rank)
    handle.remove()
    return captured["h"]


def test_rank_128_equals_no_truncation():
    mapper = make_mapper(width=32).eval()
    t, l = torch.tensor([100.0, 900.0]), torch.tensor([3.0, 12.0])
    assert torch.equal(mapper(t, l, rank=128), mapper(t, l))


@pytest.mark.parametrize("rank", [1, 2, 8, 64, 127])
def test_rank_r_zeroes_exactly_the_hidden_dims_from_r(rank):
    mapper = make_mapper(width=32).eval()
    full = _captured_hidden(mapper, None)
    hidden = _captured_hidden(mapper, rank)
    assert torch.equal(hidden[:, :rank], full[:, :rank])
    assert (hidden[:, rank:] == 0).all()
    assert (full[:, rank:] != 0).any()


def test_truncation_approaches_the_full_concept_monotonically_in_hidden_space():
    mapper = make_mapper(width=32, seed=5).eval()
    full = _captured_hidden(mapper, None)
    distances = [float((_captured_hidden(mapper, r) - full).norm()) for r in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert distances[-1] == 0
    assert all(a > b for a, b in zip(distances, distances[1:]))


def test_truncate_rejects_bad_ranks():
    from stc.errors import BadInput

    with pytest.raises(BadInput, match="ranks 1..128; rank 0 is outside"):  # the one rank rule (check_rank)
        truncate(torch.ones(1, 128), 0)
    with pytest.raises(BadInput, match="ranks 1..128; rank 129 is outside"):
        truncate(torch.ones(1, 128), 129)


def test_nested_dropout_per_group_with_probability_half():
    mapper = make_mapper(width=8).train()
    hidden = torch.ones(4000, 128)
    groups = torch.arange(4000) // 4  # 1000 groups ("mapper calls") of 4 samples
    out = mapper.nested_dropout(hidden, groups, torch.Generator().manual_seed(0))
    kept = (out != 0).sum(dim=1)  # per sample: number of leading dims kept
    # kept dims are always a prefix
    assert all(bool((out[i, : kept[i]] == 1).all()) for i in range(0, 4000, 97))
    truncated_groups = (kept.view(1000, 4) < 128).any(dim=1)
    assert 0.44 < truncated_groups.float().mean() < 0.56
    # within a truncated group each sample has its own k in 0..127
    assert kept.min() == 0 and len(set(kept.tolist())) > 100


def test_nested_dropout_is_seeded_and_off_in_eval():
    mapper = make_mapper(width=8)
    t, l = torch.full((64,), 300.0), torch.arange(64.0) % 16
    mapper.train()
    a = mapper(t, l, dropout_groups=l.long(), generator=torch.Generator().manual_seed(1))
    b = mapper(t, l, dropout_groups=l.long(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    mapper.eval()
    assert torch.equal(mapper(t, l), mapper(t, l, generator=torch.Generator().manual_seed(2)))
    assert not torch.equal(a, mapper(t, l))


def test_config_round_trips_and_drops_unknown_keys():
    config = MapperConfig(text_width=1024, norm_scale=0.37, bypass=False)
    data = config.to_dict()
    assert MapperConfig.from_dict({**data, "from_the_future": 1}) == config
    with pytest.raises(ValueError):
        MapperConfig(text_width=0, norm_scale=1.0)
    assert math.isclose(MapperConfig.from_dict(data).norm_scale, 0.37)
