"""The CPU guarantees, on a CUDA GPU: padded batches (sdpa in float32, flash-attn in bfloat16 where it is installed)
and cached keys in bfloat16 against float64. Skipped without CUDA; ``bash bench/device_check.sh`` runs them."""

import copy
import importlib.util

import pytest
import torch
from conftest import TRAIN_LEN, tiny_model
from test_batches import PAD, TOLERANCE, left_padded, rows
from test_precision import RE_ROTATING, decode, relative, rotated_as_the_model_rotates

import enhance_long
from enhance_long.patch import attended_keys

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/device_check.sh)")
FLASH = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
METHODS = [("none", {}), ("yarn", {}), ("consistent_ntk", {"bucket": 8}), ("dynamic_yarn", {"bucket": 4})]
METHODS_WITH_TWO_VIEWS = [*METHODS, ("self_extend", {"group": 3, "window": 8}), ("rerope", {"window": 12})]


@torch.no_grad()
def batch_and_alone(model, device):
    long, short = (row.to(device) for row in rows())
    ids, mask, positions = (t.to(device) for t in left_padded(long, short))
    batch = model(ids, attention_mask=mask, position_ids=positions).logits
    return batch, model(long[None]).logits[0], model(short[None]).logits[0]


@pytest.mark.parametrize("rope,knobs", METHODS_WITH_TWO_VIEWS)
def test_on_a_gpu_a_padded_row_equals_the_row_alone(rope, knobs):
    model = enhance_long.apply(tiny_model().cuda(), rope=rope, logn=True, **knobs)
    batch, long, short = batch_and_alone(model, "cuda")
    torch.testing.assert_close(batch[0], long, **TOLERANCE)
    torch.testing.assert_close(batch[1, PAD:], short, **TOLERANCE)


@FLASH
@pytest.mark.parametrize("rope,knobs", METHODS)
def test_on_flash_attention_a_padded_row_is_the_row_alone_to_bfloat16_rounding(rope, knobs):
    def errors(rope, knobs):
        model = tiny_model(attention="flash_attention_2").cuda().to(torch.bfloat16)
        batch, long, short = batch_and_alone(enhance_long.apply(model, rope=rope, logn=True, **knobs), "cuda")
        return relative(batch[1, PAD:], short)

    assert errors(rope, knobs) <= 2 * errors("none", {}) + 1e-3


@pytest.mark.parametrize("rope,knobs", RE_ROTATING)
def test_on_a_gpu_bfloat16_cached_keys_stay_within_one_fresh_rotation(rope, knobs):
    low = tiny_model().cuda().to(torch.bfloat16)
    reference = copy.deepcopy(low).to(torch.float64)
    low, reference = (enhance_long.apply(m, rope=rope, logn=True, **knobs) for m in (low, reference))
    tokens = torch.randint(0, 97, (1, 6 * TRAIN_LEN), generator=torch.Generator().manual_seed(1)).cuda()
    low_cache, _ = decode(low, tokens, TRAIN_LEN // 2)
    reference_cache, _ = decode(reference, tokens, TRAIN_LEN // 2)
    expected = attended_keys(reference, reference_cache, 0)
    final = reference._enhance_long.frequencies(tokens.shape[1], torch.device("cuda"))
    fresh = rotated_as_the_model_rotates(low_cache.layers[0].keys, final, torch.bfloat16)
    assert relative(attended_keys(low, low_cache, 0), expected) <= 2 * relative(fresh, expected)
