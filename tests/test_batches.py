"""A row of a padded batch is computed exactly as the row alone: in one forward, through the cache in chunks, and in
``generate``, for every method and every backend that runs it (flash needs a GPU: bench/device_check.sh).

The one exception is ``dynamic_ntk``, transformers' own behaviour: one base per forward from its longest row, so a
row's logits depend on the other rows (checked here too, so the documentation stays true).
"""

import pytest
import torch
from conftest import SMALL_VIEWS, TRAIN_LEN, tiny_model
from transformers import DynamicCache

import enhance_long
from enhance_long.methods.catalog import CATALOG

T = TRAIN_LEN
PAD = 17  # the shorter row is this many tokens shorter, left-padded for generation, right-padded for scoring
BATCH_INVARIANT = [
    ("none", {}),
    ("linear", {}),
    ("ntk", {}),
    ("consistent_ntk", {"bucket": 1}),
    ("consistent_ntk", {"bucket": 8}),
    ("consistent_ntk", {"bucket": 1, "schedule": "per_forward"}),
    ("yarn", {}),
    ("ntk_by_parts", {}),
    ("dynamic_yarn", {"bucket": 4}),
    *SMALL_VIEWS,
]
BACKENDS = ("eager", "sdpa", "flex_attention")
TOLERANCE = {"rtol": 0, "atol": 2e-4}


def rows(length: int = 4 * T):
    g = torch.Generator().manual_seed(5)
    return torch.randint(2, 97, (length,), generator=g), torch.randint(2, 97, (length - PAD,), generator=g)


def left_padded(long: torch.Tensor, short: torch.Tensor):
    """input_ids, attention_mask and position ids as ``generate`` makes them (``cumsum(mask) - 1``, pads at 0)."""
    ids = torch.stack([long, torch.cat([torch.zeros(PAD, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def alone(model, long, short):
    return model(long[None]).logits[0], model(short[None]).logits[0]


def patched(rope, knobs, backend="sdpa", **config):
    return enhance_long.apply(tiny_model(attention=backend, **config), rope=rope, logn=True, **knobs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope,knobs", BATCH_INVARIANT)
def test_a_left_padded_row_in_one_forward_equals_the_row_alone(rope, knobs, backend):
    model = patched(rope, knobs, backend)
    long, short = rows()
    ids, mask, positions = left_padded(long, short)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
    expected_long, expected_short = alone(model, long, short)
    torch.testing.assert_close(batch[0], expected_long, **TOLERANCE)
    torch.testing.assert_close(batch[1, PAD:], expected_short, **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope,knobs", BATCH_INVARIANT)
def test_a_right_padded_row_scores_as_the_row_alone(rope, knobs, backend):
    model = patched(rope, knobs, backend)
    long, short = rows()
    ids = torch.stack([long, torch.cat([short, torch.zeros(PAD, dtype=torch.long)])])
    mask = torch.ones_like(ids)
    mask[1, -PAD:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits  # default positions: 0.. for every row
    expected_long, expected_short = alone(model, long, short)
    torch.testing.assert_close(batch[0], expected_long, **TOLERANCE)
    torch.testing.assert_close(batch[1, : len(short)], expected_short, **TOLERANCE)


def _stock_mask_through_the_cache(rope: str, backend: str) -> bool:
    """Whether this case runs the stock flex call with transformers' own padded mask through a cache, which torch
    2.13's CPU inductor fails to compile for the unpatched model too."""
    method = CATALOG[rope]
    return backend == "flex_attention" and not method.consistent and method.views is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope,knobs", BATCH_INVARIANT)
def test_a_left_padded_row_through_the_cache_in_chunks_equals_the_row_alone(rope, knobs, backend):
    if _stock_mask_through_the_cache(rope, backend):
        pytest.skip("torch 2.13's CPU inductor cannot compile flex attention over a padded cache (stock model too)")
    model = patched(rope, knobs, backend)
    long, short = rows()
    ids, mask, positions = left_padded(long, short)
    cache, chunks = DynamicCache(config=model.config), []
    with torch.no_grad():
        for s in range(0, ids.shape[1], 13):
            e = s + 13
            out = model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e], cache=cache)
            chunks.append(out.logits)
    chunked = torch.cat(chunks, dim=1)
    if knobs.get("schedule") == "per_forward":  # each chunk is its own forward: compare with the row fed alike
        expected_long, expected_short = (
            fed_in_chunks(model, row, 13, offset) for row, offset in ((long, 0), (short, PAD))
        )
    else:
        expected_long, expected_short = alone(model, long, short)
    torch.testing.assert_close(chunked[0], expected_long, **TOLERANCE)
    torch.testing.assert_close(chunked[1, PAD:], expected_short, **TOLERANCE)


@torch.no_grad()
def fed_in_chunks(model, row: torch.Tensor, chunk: int, offset: int) -> torch.Tensor:
    """The row alone, fed through a cache in the chunks it has inside the batch (the first one ``offset`` shorter)."""
    cache, pieces, start = DynamicCache(config=model.config), [], 0
    for end in range(chunk - offset, len(row) + chunk, chunk):
        end = min(max(end, 0), len(row))
        if end > start:
            pieces.append(model(row[None, start:end], cache=cache).logits[0])
            start = end
    return torch.cat(pieces)


@pytest.mark.parametrize("rope,knobs", BATCH_INVARIANT)
def test_generate_on_a_left_padded_batch_gives_each_row_its_own_greedy_tokens(rope, knobs):
    model = patched(rope, knobs)
    long, short = rows(T + 8)  # prompts just past T; 2T new tokens take the rows far past it
    ids, mask, _ = left_padded(long, short)
    settings = {"max_new_tokens": 2 * T, "min_new_tokens": 2 * T, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **settings)
        one = [
            model.generate(row[None], attention_mask=torch.ones_like(row[None]), **settings)[0] for row in (long, short)
        ]
    assert torch.equal(batch[0], one[0])
    assert torch.equal(batch[1, PAD:], one[1])


def test_dynamic_ntk_is_batch_dependent_by_design():
    # transformers' dynamic NTK rotates a whole forward with the base of its longest row
    model = patched("dynamic_ntk", {})
    long, short = rows()
    ids, mask, positions = left_padded(long, short)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
    _, expected_short = alone(model, long, short)
    assert (batch[1, PAD:] - expected_short).abs().max() > TOLERANCE["atol"]  # outside what the others must meet


def test_consistent_rows_take_their_own_frequencies_not_the_longest_rows():
    model = patched("consistent_ntk", {"bucket": 1})
    long, short = rows()
    ids, mask, positions = left_padded(long, short)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions)
    plan = model._enhance_long.plan
    assert plan.lengths[0, -1] == len(long) and plan.lengths[1, -1] == len(short)
    assert len(plan.segments) > len(long) - T  # the rows change frequencies at different queries


def test_the_rotated_key_copy_is_derived_again_after_the_cache_is_reordered():
    """Beam search reorders a cache's rows (``reorder_cache``): the rotated copy beside it must follow."""
    model = patched("consistent_ntk", {"bucket": 4})
    long, _ = rows()
    ids = torch.stack([long, long.flip(0)])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        cache.reorder_cache(torch.tensor([1, 0]))
        step = model(ids[[1, 0], -1:], cache=cache).logits[:, -1]
        full = model(ids[[1, 0]]).logits[:, -1]
    torch.testing.assert_close(step, full, **TOLERANCE)
