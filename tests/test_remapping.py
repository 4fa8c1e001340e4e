"""The methods that remap relative positions beyond a window: Self-Extend, ReRoPE and leaky ReRoPE.

The oracle is a deliberately naive implementation that un-rotates the stock model's queries and keys and scores
every (query, key) pair at the relative position the paper defines.
"""

import math

import pytest
import torch
from conftest import TRAIN_LEN, logits, step_by_step_errors, tiny_model
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import enhance_long
from enhance_long.methods import rope_inv_freq, rotate_in_place

T = TRAIN_LEN
THETA = 10000.0


def relative_position(rope: str, knobs: dict, i: int, j: int) -> float:
    """The papers' relative position of query i and key j, written out case by case."""
    window = knobs["window"]
    if i - j < window:
        return i - j
    if rope == "self_extend":
        group = knobs["group"]
        return (i // group + window - window // group) - j // group
    if rope == "rerope":
        return window
    return window + (i - j - window) / knobs["leak"]


def oracle_attention(rope: str, knobs: dict):
    """Attention over un-rotated queries and keys, each pair scored at its relative position (no cache)."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        inv_freq = rope_inv_freq(THETA, query.shape[-1])
        n = query.shape[2]
        unrotate = -torch.arange(n, dtype=torch.float64)[:, None] * inv_freq.double()
        q, k = query.clone(), key.clone()
        for x in (q, k):
            rotate_in_place(x, unrotate.cos().float()[None], unrotate.sin().float()[None])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = value.repeat_interleave(q.shape[1] // value.shape[1], dim=1)
        out = torch.zeros_like(q)
        for i in range(n):
            rel = torch.tensor([relative_position(rope, knobs, i, j) for j in range(i + 1)], dtype=torch.float64)
            angle = rel[:, None] * inv_freq.double()
            qi = q[:, :, i : i + 1].expand(-1, -1, i + 1, -1).clone()
            rotate_in_place(qi, angle.cos().float()[None], angle.sin().float()[None])
            scores = (qi * k[:, :, : i + 1]).sum(-1) * scaling
            out[:, :, i] = torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), v[:, :, : i + 1])
        return out.transpose(1, 2), None

    return attention


REMAPPING = [
    ("self_extend", {"group": 3, "window": 8}),
    ("rerope", {"window": 12}),
    ("leaky_rerope", {"window": 12, "leak": 4.0}),
]


@pytest.mark.parametrize("rope,knobs", REMAPPING)
def test_position_remapping_methods_match_a_pairwise_oracle(rope, knobs, ids):
    name = f"oracle_{rope}"
    AttentionInterface.register(name, oracle_attention(rope, knobs))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    reference = tiny_model(attention=name)
    for backend in ("eager", "sdpa", "flex_attention"):
        model = enhance_long.apply(tiny_model(attention=backend), rope=rope, logn=False, **knobs)
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=2e-5)


@pytest.mark.parametrize("rope,knobs", REMAPPING)
def test_position_remapping_methods_are_consistent_with_the_cache(rope, knobs, ids):
    model = enhance_long.apply(tiny_model(), rope=rope, logn=True, **knobs)
    assert max(step_by_step_errors(model, ids, T // 2)) < 1e-5
    cache = DynamicCache(config=model.config)
    chunks = [logits(model, ids[:, s : s + 11], cache=cache, use_cache=True) for s in range(0, ids.shape[1], 11)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), logits(model, ids), rtol=0, atol=2e-5)


def test_position_remapping_is_the_stock_model_within_its_window(monkeypatch, ids):
    import enhance_long.attention as attention

    merged = []
    for name in ("two_view_pieces", "two_view_attention"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, original=original, **k: merged.append(1) or original(*a, **k))
    stock = logits(tiny_model(), ids[:, :20])
    for rope, knobs in (("self_extend", {"group": 4, "window": 20}), ("rerope", {"window": 20})):
        model = enhance_long.apply(tiny_model(), rope=rope, logn=False, **knobs)
        # no key is 20 tokens away: the stock attention runs, bit for bit
        torch.testing.assert_close(logits(model, ids[:, :20]), stock, rtol=0, atol=0)
        assert not merged
        logits(model, ids[:, :21])
        assert merged, "one token past the window, the two views are merged"
        merged.clear()


def test_position_remapping_keeps_far_relative_positions_inside_the_trained_range():
    knobs = {"group": 4, "window": 8}
    assert relative_position("self_extend", knobs, 3 * T - 1, 0) < T  # 95 // 4 + 8 - 2 = 29
    assert relative_position("leaky_rerope", {"window": 8, "leak": 4.0}, 3 * T - 1, 0) == pytest.approx(8 + 87 / 4)
    assert math.isclose(relative_position("rerope", {"window": 8}, 3 * T - 1, 0), 8)


def test_flash_attention_is_refused_for_position_remapping(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="rope='rerope' merges two position views .* use attention=sdpa"):
        enhance_long.apply(model, rope="rerope")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rope": "self_extend", "group": 0}, "group=0 is invalid for rope='self_extend'; it must be an integer >= 1"),
        ({"rope": "rerope", "window": 2.5}, "window=2.5 is invalid for rope='rerope'; it must be an integer >= 1"),
        ({"rope": "leaky_rerope", "leak": 0}, "leak=0 is invalid for rope='leaky_rerope'"),
        ({"rope": "dynamic_yarn", "alpha": 2.0}, "rope='dynamic_yarn' does not take alpha"),
    ],
)
def test_bad_knobs_of_the_new_methods(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        enhance_long.apply(tiny_model(), **kwargs)
