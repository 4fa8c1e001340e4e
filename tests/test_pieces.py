"""Attention from pieces merged by log-sum-exp: the fused kernel against matrix products and PyTorch's own
attention, the Self-Extend / ReRoPE decomposition against the blockwise reference, and the patched model taking
this path on sdpa (and matching the masked path it replaces)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TRAIN_LEN, logits, tiny_model

import enhance_long
import enhance_long.attention as attention
from enhance_long.methods import pieces, rope_inv_freq
from enhance_long.methods.pieces import Merged, attend, causal_attention
from enhance_long.methods.relative import (
    dual_chunk_views,
    lambda_views,
    leaky_rerope_positions,
    plan_pieces,
    rerope_positions,
    self_extend_positions,
    sink_views,
    string_views,
    two_view_attention,
    two_view_pieces,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/device_check.sh runs these)")


def qkv(n, m, heads=4, kv_heads=2, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, heads, n, dim, generator=g).to(dtype),
        torch.randn(2, kv_heads, m, dim, generator=g).to(dtype),
        torch.randn(2, kv_heads, m, dim, generator=g).to(dtype),
    )


def reference(q, k, v, scale, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).float()


def efficient_attention_contract(query, key, value, bias, compute_lse, dropout, causal, scale=None):
    """CUDA's memory-efficient kernel as ``attend`` calls it, on a CPU: as many key heads as query heads, a
    log-sum-exp padded to a multiple of 32 rows (the padding is NaN, so reading it shows)."""
    assert bias is None and compute_lse and dropout == 0.0
    if key.shape[1] != query.shape[1]:
        raise RuntimeError("the memory-efficient kernel needs as many key heads as query heads")
    n, m = query.shape[-2], key.shape[-2]
    scores = query.float() @ key.float().transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    padded = torch.full((*lse.shape[:-1], -(-n // 32) * 32), float("nan"))
    padded[..., :n] = lse
    output = (scores - lse[..., None]).exp() @ value.float()
    return output.to(query.dtype), padded, torch.empty(()), torch.empty(())


@pytest.fixture(params=["fused", "fused, heads repeated", "gpu kernel's contract", "matmul"])
def kernel(request, monkeypatch):
    if request.param == "matmul":
        monkeypatch.setattr(pieces, "_CPU_FLASH", None)
    if request.param == "fused, heads repeated":  # a torch whose CPU kernel needs as many key heads as query heads
        monkeypatch.setattr(pieces, "_native_gqa", lambda: False)
    if request.param == "gpu kernel's contract":  # the GPU path's glue: heads repeated or stacked, padding dropped
        monkeypatch.setattr(pieces, "_GPU_EFFICIENT", efficient_attention_contract)
        monkeypatch.setattr(pieces, "_kernel", lambda query: pieces._gpu_kernel)
    assert pieces.fused(torch.empty(1, 1, 1, 8)) == (request.param != "matmul")
    return request.param


def test_the_gpu_kernel_is_used_only_where_it_agrees_with_matrix_products(monkeypatch):
    agrees = pieces._gpu_kernel_agrees.__wrapped__  # the probe itself, not its per-kind cache
    monkeypatch.setattr(pieces, "_GPU_EFFICIENT", efficient_attention_contract)
    assert agrees(torch.device("cpu"), torch.float32, 16)
    assert agrees(torch.device("cpu"), torch.bfloat16, 16)

    def log2_lse(*args, **kwargs):  # a torch whose kernel reported base-2 log-sum-exps would merge pieces wrongly
        output, lse, *rest = efficient_attention_contract(*args, **kwargs)
        return output, lse / math.log(2), *rest

    monkeypatch.setattr(pieces, "_GPU_EFFICIENT", log2_lse)
    assert not agrees(torch.device("cpu"), torch.float32, 16)

    def refuses(*args, **kwargs):
        raise RuntimeError("No available kernel for this head size")

    monkeypatch.setattr(pieces, "_GPU_EFFICIENT", refuses)
    assert not agrees(torch.device("cpu"), torch.float32, 16)
    assert not pieces.fused(torch.empty(1, 1, 1, 8, device="meta"))  # no kernel off CPU and CUDA


@pytest.mark.parametrize("causal", [False, True])
def test_attend_is_attention_with_its_log_sum_exp(kernel, causal):
    q, k, v = qkv(9, 9 if causal else 13)
    output, lse = attend(q, k, v, 0.3, causal=causal, max_block_elements=50)
    mask = torch.ones(9, 9, dtype=torch.bool).tril() if causal else None
    torch.testing.assert_close(output, reference(q, k, v, 0.3, mask))
    scores = torch.matmul(q, k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.3
    if causal:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))


def test_pieces_over_disjoint_keys_merge_into_attention_over_all(kernel):
    q, k, v = qkv(7, 30)
    merged = Merged(attend(q, k[:, :, :10], v[:, :, :10], 0.25), into=torch.full(q.shape, float("nan")))
    merged.add(attend(q, k[:, :, 10:20], v[:, :, 10:20], 0.25))
    merged.add(attend(q[:, :, 3:], k[:, :, 20:], v[:, :, 20:], 0.25), slice(3, None))  # later rows see more keys
    output = merged.merge()
    assert output is merged.into
    torch.testing.assert_close(output[:, :, :3], reference(q[:, :, :3], k[:, :, :20], v[:, :, :20], 0.25))
    torch.testing.assert_close(output[:, :, 3:], reference(q[:, :, 3:], k, v, 0.25))
    # bottom-right causal: the last 7 of 30 positions, and a square
    allowed = torch.arange(30)[None] <= torch.arange(23, 30)[:, None]
    torch.testing.assert_close(causal_attention(q, k, v, 0.25), reference(q, k, v, 0.25, allowed))
    square = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(
        causal_attention(q, k[:, :, :7], v[:, :, :7], 0.25), reference(q, k[:, :, :7], v[:, :, :7], 0.25, square)
    )


def test_attend_in_bfloat16_stays_close():
    q, k, v = qkv(16, 16, dtype=torch.bfloat16)
    output, _ = attend(q, k, v, 0.25, causal=True)
    expected = reference(q.float(), k.float(), v.float(), 0.25, torch.ones(16, 16, dtype=torch.bool).tril())
    torch.testing.assert_close(output, expected, atol=3e-2, rtol=3e-2)


FAR_VIEWS = {
    "self_extend": lambda w: self_extend_positions(3, w),
    "rerope": rerope_positions,
    "leaky_rerope": lambda w: leaky_rerope_positions(w, 4.0),
}


@pytest.mark.parametrize("method", FAR_VIEWS)
@pytest.mark.parametrize(
    ("n", "kv", "window"),
    [(50, 50, 8), (50, 50, 7), (50, 50, 1), (50, 50, 64), (9, 9, 3), (1, 50, 8), (13, 50, 8), (37, 100, 10)],
)
def test_two_view_pieces_equal_the_blockwise_two_view_attention(kernel, method, n, kv, window):
    q, k, v = qkv(n, kv)
    far = FAR_VIEWS[method](window)
    inv_freq = rope_inv_freq(10000.0, 16)
    q_pos, k_pos = torch.arange(kv - n, kv)[None], torch.arange(kv)[None]

    def allowed(start, end):
        return (torch.arange(kv)[None] <= q_pos[0, start:end, None])[None, None]

    expected = two_view_attention(q, k, v, q_pos, k_pos, far, window, inv_freq, 0.25, allowed)
    for block in (4, 128):
        torch.testing.assert_close(two_view_pieces(q, k, v, far, window, inv_freq, 0.25, block=block), expected)


VIEWS = {
    "dual_chunk": lambda: dual_chunk_views(12, 4),  # chunks of 8
    "dual_chunk, short chunks": lambda: dual_chunk_views(5, 2),  # chunks of 3, shorter than the blocks
    "string": lambda: string_views(10, 3),
    "lm_infinite": lambda: lambda_views(12, 3),
    "lm_infinite, no global keys": lambda: lambda_views(7, 0),
    "attention_sink": lambda: sink_views(2, 10),
}


@pytest.mark.parametrize("method", VIEWS)
@pytest.mark.parametrize(("n", "kv"), [(50, 50), (9, 9), (1, 50), (13, 50), (37, 100), (1, 3)])
def test_pieces_of_every_view_equal_the_blockwise_views_attention(kernel, method, n, kv):
    q, k, v = qkv(n, kv)
    views = VIEWS[method]()
    inv_freq = rope_inv_freq(10000.0, 16)
    q_pos, k_pos = torch.arange(kv - n, kv)[None], torch.arange(kv)[None]

    def allowed(start, end):
        return (torch.arange(kv)[None] <= q_pos[0, start:end, None])[None, None]

    expected = two_view_attention(q, k, v, q_pos, k_pos, views, inv_freq=inv_freq, scaling=0.25, allowed=allowed)
    for block in (4, 128):
        got = two_view_pieces(q, k, v, views, inv_freq=inv_freq, scaling=0.25, block=block)
        torch.testing.assert_close(got, expected)


def test_every_piece_is_an_unmasked_call_or_a_causal_square_and_each_pair_is_read_once():
    """The plan itself: each (row, key) pair a method attends is in exactly one piece, and nothing else is."""
    for method, make in VIEWS.items():
        views = make()
        for n, kv in ((50, 50), (13, 50), (1, 40)):
            plan = plan_pieces(n, kv, views, rope_inv_freq(10000.0, 16), block=8)
            count = torch.zeros(n, kv, dtype=torch.long)
            for s, _, block_pieces in plan.blocks:
                for piece in block_pieces:
                    (r0, r1), (k0, k1) = piece.rows, piece.keys
                    rows, keys = torch.arange(r0, r1)[:, None], torch.arange(k0, k1)[None]
                    seen = {"full": torch.ones(r1 - r0, k1 - k0, dtype=torch.bool)}
                    seen["causal"] = keys - k0 <= rows - r0
                    seen["flipped"] = (k1 - 1 - keys) <= (r1 - 1 - rows)
                    count[s + r0 : s + r1, k0:k1] += seen[piece.kind].long()
            i = torch.arange(kv - n, kv)[:, None]
            j = torch.arange(kv)[None]
            owned = sum(((view.lo(i) <= j) & (j < view.hi(i))).long() for view in views.views)
            assert torch.equal(count, owned), method
            assert owned.max() == 1 and bool((owned.sum(-1) > 0).all())


def _count_calls(monkeypatch, name):
    calls = []
    original = getattr(attention, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, name, counted)
    return calls


DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_on_a_gpu_attend_runs_the_efficient_kernel_and_matches_matrix_products(dtype, causal):
    q, k, v = (t.cuda() for t in qkv(70, 70 if causal else 90, dtype=dtype))
    assert pieces._kernel(q) is pieces._gpu_kernel, "the probe refused this GPU's kernel"
    output, lse = attend(q, k, v, 0.3, causal=causal)
    expected_output, expected_lse = pieces._by_products(q.float(), k.float(), v.float(), 0.3, causal)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(output, expected_output, **tolerance)
    torch.testing.assert_close(lse, expected_lse, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("rope", "knobs", "path"),
    [
        ("consistent_ntk", {"bucket": 8}, "causal_attention"),
        ("self_extend", {"group": 3, "window": 8}, "two_view_pieces"),
        ("dual_chunk", {"chunk_size": 12, "local_window": 4, "mscale": 0.1}, "two_view_pieces"),
        ("string", {"shifted_offset": 10, "local_value": 3}, "two_view_pieces"),
        ("lm_infinite", {"window": 12, "n_global": 3}, "two_view_pieces"),
        ("attention_sink", {"n_sink": 2, "window": 10}, "two_view_pieces"),
    ],
)
def test_the_patched_model_takes_the_pieces_path_on_sdpa_and_matches_the_masked_path(
    monkeypatch, ids, rope, knobs, path, device
):
    model = enhance_long.apply(tiny_model().to(device), rope=rope, logn=True, **knobs)
    ids = ids.to(device)
    calls = _count_calls(monkeypatch, path)
    assembled = logits(model, ids)
    assert calls, f"sdpa on {device} should run {path}"
    monkeypatch.setattr(attention, "fused", lambda query: False)
    calls.clear()
    masked = logits(model, ids)
    assert not calls
    torch.testing.assert_close(assembled, masked, rtol=0, atol=2e-5 if device == "cpu" else 1e-4)


def test_padding_keeps_the_masked_path(monkeypatch):
    model = enhance_long.apply(tiny_model(), rope="consistent_ntk", bucket=8)
    calls = _count_calls(monkeypatch, "causal_attention")
    ids = torch.randint(0, 97, (2, 2 * TRAIN_LEN), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert not calls
