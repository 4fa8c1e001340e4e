"""The pure math of each method, checked against hand-computed values and transformers' own functions."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from enhance_long.methods import (
    as_pairs,
    dynamic_ntk_base,
    logn_scale,
    ntk_base,
    rope_inv_freq,
    rotate_in_place,
    rotated,
    rotation_delta,
    scheduled_length,
    turned,
    yarn_frequencies,
)

T = 4096


def test_logn_factor_at_the_trained_length_boundary():
    # 1-based positions T-1, T, T+1, 4T are 0-based T-2, T-1, T, 4T-1
    factors = logn_scale(torch.tensor([T - 2, T - 1, T, 4 * T - 1]), T).tolist()
    assert factors[0] == 1.0
    assert factors[1] == 1.0
    assert factors[2] == pytest.approx(math.log(T + 1) / math.log(T), rel=1e-6)
    assert factors[3] == pytest.approx(math.log(4 * T) / math.log(T), rel=1e-6)
    assert factors[3] == pytest.approx(1.1666666, rel=1e-5)  # log(2^14)/log(2^12) = 14/12


def test_ntk_base_formula():
    assert ntk_base(10000.0, 1.0, 128) == 10000.0
    assert ntk_base(10000.0, 2.0, 128) == pytest.approx(10000.0 * 2 ** (128 / 126))


def test_dynamic_ntk_base_is_stock_up_to_train_len_then_grows():
    assert dynamic_ntk_base(1e4, 2.0, T, T, 64) == 1e4
    assert dynamic_ntk_base(1e4, 2.0, 10, T, 64) == 1e4
    # at L = 2T with alpha = 2: (2*2 - 1)^(64/62) = 3^(64/62)
    assert dynamic_ntk_base(1e4, 2.0, 2 * T, T, 64) == pytest.approx(1e4 * 3 ** (64 / 62))
    bases = [dynamic_ntk_base(1e4, 2.0, n, T, 64) for n in (T + 1, 2 * T, 4 * T)]
    assert bases == sorted(bases) and bases[0] > 1e4


def test_dynamic_ntk_matches_transformers_dynamic_frequencies():
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=T,
        rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e4},
    )  # fmt: skip
    for seq_len in (T // 2, T, T + 1, 3 * T):
        reference, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=seq_len)
        ours = rope_inv_freq(dynamic_ntk_base(1e4, 3.0, seq_len, T, 16), 16)
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


def test_scheduled_length_buckets_only_past_train_len():
    assert [scheduled_length(n, 100, 1) for n in (1, 100, 101, 357)] == [100, 100, 101, 357]
    assert [scheduled_length(n, 100, 64) for n in (50, 100, 101, 164, 165)] == [100, 100, 164, 164, 228]


def test_rotation_delta_turns_one_rotation_into_another():
    positions = torch.arange(50)[None]
    keys = torch.randn(1, 2, 50, 16, generator=torch.Generator().manual_seed(0))
    slow, fast = rope_inv_freq(1e4, 16), rope_inv_freq(3e4, 16)

    def rotated(inv_freq):
        out = keys.clone()
        rotate_in_place(out, *rotation_delta(positions, torch.zeros(8), inv_freq))
        return out

    moved = rotated(slow)
    rotate_in_place(moved, *rotation_delta(positions, slow, fast))
    torch.testing.assert_close(moved, rotated(fast), rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotations_match_transformers_rotate_half_convention(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    keys = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(2))
    angles = torch.arange(7)[None, :, None].float() * rope_inv_freq(100.0, 8)
    emb = torch.cat((angles, angles), dim=-1).expand(2, -1, -1)
    _, reference = apply_rotary_pos_emb(keys, keys, emb.cos(), emb.sin())
    cos, sin = angles.cos().expand(2, -1, -1), angles.sin().expand(2, -1, -1)
    ours = keys.to(dtype)
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(rotated(ours, cos, sin).float(), reference, **tolerance)
    rotate_in_place(ours, cos, sin)
    torch.testing.assert_close(ours.float(), reference, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paired_rotation_is_the_rotation_laid_out_by_pairs_and_scores_the_same(dtype):
    g = torch.Generator().manual_seed(4)
    queries, keys = torch.randn(2, 3, 7, 8, generator=g).to(dtype), torch.randn(2, 3, 7, 8, generator=g).to(dtype)
    angles = torch.rand(2, 7, 4, generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    by_pairs = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # x1_0, x2_0, x1_1, x2_1, ... of the rotate-half layout
    turn = torch.complex(cos, sin)
    paired_queries, paired_keys = turned(as_pairs(queries), turn, dtype), turned(as_pairs(keys), turn, dtype)
    assert paired_keys.dtype == dtype
    tolerance = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(paired_keys, rotated(keys, cos, sin)[..., by_pairs], **tolerance)
    scores = rotated(queries, cos, sin).float() @ rotated(keys, cos, sin).float().transpose(-1, -2)
    torch.testing.assert_close(paired_queries.float() @ paired_keys.float().transpose(-1, -2), scores, **tolerance)


def test_yarn_frequencies_come_from_transformers():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=T)
    inv_freq, scaling = yarn_frequencies(config, 4.0, T, 32.0, 1.0)
    stock = rope_inv_freq(config.rope_parameters["rope_theta"], 16)
    assert scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert inv_freq[0] == pytest.approx(stock[0].item())  # highest frequency kept
    assert inv_freq[-1] == pytest.approx(stock[-1].item() / 4.0)  # lowest frequency interpolated
