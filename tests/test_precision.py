"""Low precision, as users run it, on the CPU (torch's bfloat16 and float16 kernels): each method against the same
weights in float64. A method is correct when its result depends on the dtype by no more than one rounding."""

import copy

import pytest
import torch
from conftest import SMALL_VIEWS, TRAIN_LEN, tiny_model
from transformers import DynamicCache

import enhance_long
from enhance_long.patch import attended_keys

T = TRAIN_LEN
LOW = [torch.bfloat16, torch.float16]
RE_ROTATING = [  # methods whose cached keys follow a moving base
    ("consistent_ntk", {"bucket": 1}),
    ("consistent_ntk", {"bucket": 16}),
    ("consistent_ntk", {"bucket": 1, "schedule": "per_forward"}),
    ("dynamic_yarn", {"bucket": 1}),
    ("dynamic_yarn", {"bucket": 16}),
]
EVERY_METHOD = [
    ("linear", {}),
    ("ntk", {}),
    ("dynamic_ntk", {}),
    ("consistent_ntk", {"bucket": 4}),
    ("yarn", {}),
    ("ntk_by_parts", {}),
    ("dynamic_yarn", {"bucket": 4}),
    *SMALL_VIEWS,
]


def ids(length: int = 8 * T) -> torch.Tensor:
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(1))


def twins(rope: str, dtype: torch.dtype, **knobs):
    """The tiny model with weights rounded to ``dtype``, and the same weights in float64, both patched alike."""
    low = tiny_model().to(dtype)
    reference = copy.deepcopy(low).to(torch.float64)
    return (enhance_long.apply(m, rope=rope, logn=True, **knobs) for m in (low, reference))


@torch.no_grad()
def decode(model, tokens: torch.Tensor, prompt: int):
    """Token-by-token decoding after a prompt: the cache and the logits of every position."""
    cache = DynamicCache(config=model.config)
    logits = [model(tokens[:, :prompt], cache=cache).logits]
    logits += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(prompt, tokens.shape[1])]
    return cache, torch.cat(logits, dim=1)


def relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference.double()).norm() / reference.double().norm()).item()


def rotated_as_the_model_rotates(keys: torch.Tensor, rope, dtype) -> torch.Tensor:
    """Unrotated ``keys`` (batch, heads, n, dim) rotated once at positions 0..n-1, as transformers rotates them: cos and
    sin formed in float32 and rounded to the model's dtype, then ``k * cos + rotate_half(k) * sin`` in that dtype."""
    freqs = torch.arange(keys.shape[-2], device=keys.device).float()[:, None] * rope.inv_freq.to(keys.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = ((emb.cos() * rope.scale).to(dtype), (emb.sin() * rope.scale).to(dtype))
    half = keys.shape[-1] // 2
    return keys * cos + torch.cat((-keys[..., half:], keys[..., :half]), dim=-1) * sin


@pytest.mark.parametrize(
    "rope,knobs,dtype",
    [
        *((rope, knobs, torch.bfloat16) for rope, knobs in RE_ROTATING),
        *((*RE_ROTATING[0], d) for d in LOW[1:] + [torch.float32]),
    ],
)
def test_cached_keys_stay_within_one_fresh_rotation_after_hundreds_of_base_changes(rope, knobs, dtype):
    """Decoding from T/2 to 6T moves the base up to 160 times; the keys the attention reads must still be as close
    to float64 as keys rotated once (re-rotating them in place instead left them 32x further in bfloat16 at 8T)."""
    low, reference = twins(rope, dtype, **knobs)
    tokens = ids(6 * T)
    low_cache, _ = decode(low, tokens, T // 2)
    reference_cache, _ = decode(reference, tokens, T // 2)
    expected = attended_keys(reference, reference_cache, 0)
    final = reference._enhance_long.frequencies(tokens.shape[1], torch.device("cpu"))
    fresh = rotated_as_the_model_rotates(low_cache.layers[0].keys, final, dtype)  # the cache holds keys before RoPE
    assert relative(attended_keys(low, low_cache, 0), expected) <= 2 * relative(fresh, expected)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rope,knobs", EVERY_METHOD)
def test_low_precision_logits_are_as_close_to_float64_as_the_stock_models(rope, knobs, dtype):
    tokens = ids(4 * T)
    stock_low, stock_reference = twins("none", dtype)
    low, reference = twins(rope, dtype, **knobs)
    with torch.no_grad():
        stock_error = relative(stock_low(tokens).logits, stock_reference(tokens).logits)
        single = relative(low(tokens).logits, reference(tokens).logits)
    assert single <= 1.25 * stock_error
    if rope != "dynamic_ntk":  # the others score the same text the same way, cached or not
        _, cached_low = decode(low, tokens, T // 2)
        _, cached_reference = decode(reference, tokens, T // 2)
        assert relative(cached_low, cached_reference) <= 1.25 * stock_error


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rope,knobs", [("none", {}), *EVERY_METHOD[3:]])
def test_a_padded_row_in_low_precision_is_the_row_alone_to_one_rounding(rope, knobs, dtype):
    """In bfloat16/float16 a padded batch runs other kernels than a single row; the difference must stay within the
    low-precision error itself (measured against float64), for the stock model and every method alike."""
    low, reference = twins(rope, dtype, **knobs)
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(2, 97, (4 * T,), generator=g), torch.randint(2, 97, (4 * T - 17,), generator=g)
    batch = torch.stack([long, torch.cat([torch.zeros(17, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :17] = 0
    with torch.no_grad():
        padded = low(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[1, 17:]
        expected = reference(short[None]).logits[0]
        one_rounding = relative(low(short[None]).logits[0], expected)
    assert relative(padded, expected) <= 1.5 * one_rounding
