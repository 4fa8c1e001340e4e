"""The methods that remap relative positions: Self-Extend, ReRoPE, leaky ReRoPE, STRING, Dual Chunk Attention,
LM-Infinite and attention sinks.

The oracle is a deliberately naive implementation that un-rotates the stock model's queries and keys and scores
every (query, key) pair at the relative position the paper or the official code defines (skipping the pairs a
method does not attend), times the query's attention temperature.
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


def relative_position(rope: str, knobs: dict, i: int, j: int) -> float | None:
    """The relative position of query i and key j, written out case by case from the papers and official code;
    None for a pair the method does not attend."""
    if rope == "dual_chunk":  # chunkllama_attn_replace.py: the q_t / qc_t / k_t tables and the three flash calls
        size, local = knobs["chunk_size"], knobs["local_window"]
        s = size - local
        if i // s == j // s:
            return i % s - j % s  # intra: q_t[i % s] - k_t[j]
        if i // s - j // s == 1:
            return min(s + i % s, size) - j % s  # successive: qc_t[i % s] - k_t[j]
        return min(s + s - 1, size) - j % s  # inter: qc_t at position_ids[chunk_len - 1] = s - 1
    if rope == "string":  # string_for_llama.py, decoding: the last S keys at i, the others at i - S + W
        offset, local = knobs["shifted_offset"], knobs["local_value"]
        return i - j if i - j < offset else (i - offset + local) - j
    if rope == "lm_infinite":  # lambda_attention.py: local branch i - j <= B - 1, global branch j < G at distance B
        window = knobs["window"]
        if i - j < window:
            return i - j
        return window if j < knobs["n_global"] else None
    if rope == "attention_sink":
        return streaming_distance(knobs["n_sink"], knobs["window"] - 1, i, j)
    window = knobs["window"]
    if i - j < window:
        return i - j
    if rope == "self_extend":
        group = knobs["group"]
        return (i // group + window - window // group) - j // group
    if rope == "rerope":
        return window
    return window + (i - j - window) / knobs["leak"]


def streaming_distance(start_size: int, recent_size: int, i: int, j: int) -> int | None:
    """StreamingLLM's distance by simulation: feed tokens 0..i-1 one at a time, trimming the cache to the first
    ``start_size`` and last ``recent_size`` after each (``StartRecentKVCache``, as ``eval_long_ppl.py`` does); the query
    takes the next slot and every key the slot it holds (``modify_llama.py``). None: key j has been evicted."""
    cache: list[int] = []
    for token in range(i):
        cache.append(token)
        if len(cache) > start_size + recent_size:
            cache = cache[:start_size] + cache[len(cache) - recent_size :]
    slots = [*cache, i]
    return len(cache) - slots.index(j) if j in slots else None


def logit_factor(rope: str, knobs: dict, i: int) -> float:
    """The query's attention temperature: DCA's (1 + mscale ln(L/T))^2 past T with L = i + 1, STRING's factor^2."""
    if rope == "dual_chunk" and i + 1 > T:
        return (1 + knobs["mscale"] * math.log((i + 1) / T)) ** 2
    if rope == "string":
        return knobs["attention_factor"] ** 2
    return 1.0


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
            read = [j for j in range(i + 1) if relative_position(rope, knobs, i, j) is not None]
            rel = torch.tensor([relative_position(rope, knobs, i, j) for j in read], dtype=torch.float64)
            angle = rel[:, None] * inv_freq.double()
            qi = q[:, :, i : i + 1].expand(-1, -1, len(read), -1).clone()
            rotate_in_place(qi, angle.cos().float()[None], angle.sin().float()[None])
            scores = (qi * k[:, :, read]).sum(-1) * scaling * logit_factor(rope, knobs, i)
            out[:, :, i] = torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), v[:, :, read])
        return out.transpose(1, 2), None

    return attention


REMAPPING = [
    ("self_extend", {"group": 3, "window": 8}),
    ("rerope", {"window": 12}),
    ("leaky_rerope", {"window": 12, "leak": 4.0}),
]

# Knobs small enough for the tiny model (T = 32, 96 tokens): every region of every method is reached.
VIEWS_METHODS = [
    ("dual_chunk", {"chunk_size": 12, "local_window": 4, "mscale": 0.1}),  # chunks of 8: 12 chunks
    ("dual_chunk", {"chunk_size": 20, "local_window": 12, "mscale": 0.05}),  # s = 8 <= local_window: no plateau
    ("string", {"shifted_offset": 10, "local_value": 3, "attention_factor": 1 + 0.1 * math.log(2)}),
    ("lm_infinite", {"window": 12, "n_global": 3}),
    ("attention_sink", {"n_sink": 2, "window": 10}),
]
EXACT_UP_TO = {"dual_chunk": 8, "string": 10, "lm_infinite": 12, "attention_sink": 12}  # tokens of plain attention


@pytest.mark.parametrize("rope,knobs", REMAPPING + VIEWS_METHODS)
def test_position_remapping_methods_match_a_pairwise_oracle(rope, knobs, ids):
    name = f"oracle_{rope}"
    AttentionInterface.register(name, oracle_attention(rope, knobs))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    reference = tiny_model(attention=name)
    for backend in ("eager", "sdpa", "flex_attention"):
        model = enhance_long.apply(tiny_model(attention=backend), rope=rope, logn=False, **knobs)
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=2e-5)


@pytest.mark.parametrize("rope,knobs", REMAPPING + VIEWS_METHODS)
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


@pytest.mark.parametrize("rope,knobs", VIEWS_METHODS[:1] + VIEWS_METHODS[2:])
def test_chunked_shifted_and_bounded_methods_are_the_stock_model_while_nothing_is_remapped(
    monkeypatch, rope, knobs, ids
):
    import enhance_long.attention as attention

    merged = []
    for name in ("two_view_pieces", "two_view_attention"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, original=original, **k: merged.append(1) or original(*a, **k))
    knobs = {**knobs, "attention_factor": 1.0} if rope == "string" else knobs  # STRING's default scales every logit
    model = enhance_long.apply(tiny_model(), rope=rope, logn=False, **knobs)
    n = EXACT_UP_TO[rope]
    torch.testing.assert_close(logits(model, ids[:, :n]), logits(tiny_model(), ids[:, :n]), rtol=0, atol=0)
    assert not merged
    logits(model, ids[:, : n + 1])
    assert merged, "one token further, the views are merged"


def test_string_scales_every_logit_by_its_attention_factor_squared(ids):
    factor = 1 + 0.1 * math.log(2)
    model = enhance_long.apply(tiny_model(), rope="string", logn=False, shifted_offset=40, local_value=3)
    reference = tiny_model(attention="eager")
    for layer in reference.model.layers:  # the stock model with every query scaled by factor^2
        layer.self_attn.q_proj.register_forward_hook(lambda module, args, out: out * factor**2)
    torch.testing.assert_close(logits(model, ids[:, :40]), logits(reference, ids[:, :40]), rtol=0, atol=1e-5)


def test_dual_chunk_temperature_is_one_inside_the_trained_length_and_grows_past_it(ids):
    knobs = {"chunk_size": 12, "local_window": 4}
    warm = enhance_long.apply(tiny_model(), rope="dual_chunk", logn=False, mscale=0.1, **knobs)
    cold = enhance_long.apply(tiny_model(), rope="dual_chunk", logn=False, mscale=0.0, **knobs)
    torch.testing.assert_close(logits(warm, ids[:, :T]), logits(cold, ids[:, :T]), rtol=0, atol=0)
    assert not torch.allclose(logits(warm, ids)[:, T:], logits(cold, ids)[:, T:], atol=1e-4)
    torch.testing.assert_close(logits(warm, ids)[:, :T], logits(cold, ids)[:, :T], rtol=0, atol=0)  # per query


def test_official_defaults_follow_the_trained_length():
    from enhance_long.methods.catalog import CATALOG, check_knobs

    def defaults(rope, train_len):
        return check_knobs(CATALOG[rope], {}, train_len)

    assert defaults("dual_chunk", 8192) == {"chunk_size": 6144, "local_window": 1024, "mscale": 0.05}
    assert defaults("dual_chunk", 4096) == {"chunk_size": 3072, "local_window": 512, "mscale": 0.05}  # Llama-2
    assert defaults("string", 131072) == {  # Llama 3.1: STRING's README and vLLM config
        "shifted_offset": 43253,
        "local_value": 128,
        "attention_factor": 1 + 0.1 * math.log(2),
    }
    assert defaults("string", 8192)["shifted_offset"] == 2703
    assert defaults("lm_infinite", 8192) == {"window": 8192, "n_global": 10}
    assert defaults("attention_sink", 8192) == {"n_sink": 4, "window": 8188}
    assert enhance_long.METHODS["dual_chunk"] == {"chunk_size": None, "local_window": None, "mscale": 0.05}
    model = enhance_long.apply(tiny_model(), rope="attention_sink", n_sink=6)
    assert enhance_long.describe(model)["window"] == T - 6  # describe reports the resolved values


def test_remapped_distances_stay_where_the_methods_promise():
    knobs = {"chunk_size": 12, "local_window": 4}
    pairs = [(i, j) for i in range(200) for j in range(i + 1)]
    assert max(relative_position("dual_chunk", knobs, i, j) for i, j in pairs) == 12  # chunk_size, at any length
    assert relative_position("string", {"shifted_offset": 10, "local_value": 3}, 10, 0) == 3
    # sinks: a full cache of n_sink + window slots, the query in the last one
    sink = [relative_position("attention_sink", {"n_sink": 2, "window": 10}, 199, j) for j in range(200)]
    assert [d for d in sink if d is not None] == [11, 10, *range(9, -1, -1)]
    lam = [relative_position("lm_infinite", {"window": 12, "n_global": 3}, 199, j) for j in range(200)]
    assert [d for d in lam if d is not None] == [12, 12, 12, *range(11, -1, -1)]


@pytest.mark.parametrize("rope,knobs", [("lm_infinite", {"window": 12, "n_global": 3}), ("attention_sink", {})])
def test_bounded_methods_read_a_bounded_number_of_keys_per_decoded_token(rope, knobs):
    from enhance_long.methods.catalog import CATALOG, check_knobs
    from enhance_long.methods.relative import plan_pieces

    method = CATALOG[rope]
    values = check_knobs(method, knobs, 8192)
    budget = values.get("n_global", values.get("n_sink")) + values["window"]
    for cached in (9000, 30000):
        plan = plan_pieces(1, cached + 1, method.views(values), rope_inv_freq(THETA, 16))
        ((_, _, pieces),) = plan.blocks
        assert sum(p.keys[1] - p.keys[0] for p in pieces) == budget


@pytest.mark.parametrize("rope", ["dual_chunk", "string", "lm_infinite", "attention_sink"])
def test_flash_attention_is_refused_for_the_chunked_shifted_and_bounded_methods(monkeypatch, rope):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=f"rope='{rope}' merges (two|three) position views .* use attention=sdpa"):
        enhance_long.apply(model, rope=rope, **({"shifted_offset": 10} if rope == "string" else {}))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rope": "dual_chunk", "local_window": 24}, "local_window=24 must be below chunk_size=24"),
        (
            {"rope": "dual_chunk", "chunk_size": 1},
            "chunk_size=1 is invalid for rope='dual_chunk'; it must be an integer >= 2",
        ),
        ({"rope": "dual_chunk", "local_window": 0}, "local_window=0 is invalid"),
        (
            {"rope": "dual_chunk", "mscale": -0.1},
            "mscale=-0.1 is invalid for rope='dual_chunk'; it must be a number >= 0",
        ),
        ({"rope": "string", "local_value": 10}, "local_value=10 must be below shifted_offset=10"),
        ({"rope": "string", "shifted_offset": 0}, "shifted_offset=0 is invalid"),
        (
            {"rope": "string", "attention_factor": 0.0},
            "attention_factor=0.0 is invalid for rope='string'; it must be a number > 0",
        ),
        (
            {"rope": "lm_infinite", "n_global": -1},
            "n_global=-1 is invalid for rope='lm_infinite'; it must be an integer >= 0",
        ),
        (
            {"rope": "lm_infinite", "window": 2.5},
            "window=2.5 is invalid for rope='lm_infinite'; it must be an integer >= 1",
        ),
        (
            {"rope": "attention_sink", "n_sink": 40},
            "window=-8 (its default T - n_sink at train_len=32; set it) is invalid",
        ),
        ({"rope": "attention_sink", "group": 2}, "rope='attention_sink' does not take group; it takes n_sink, window"),
    ],
)
def test_bad_knobs_of_the_chunked_shifted_and_bounded_methods_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as error:
        enhance_long.apply(tiny_model(), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
