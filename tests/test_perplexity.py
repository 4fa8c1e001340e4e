"""Perplexity: the window protocol, chunked loss against Hugging Face's own loss, cached == sliding, rows."""

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import enhance_long
from enhance_long.models import load_model
from enhance_long.tasks.base import TaskEnv
from enhance_long.tasks.perplexity import (
    TASK,
    NLLTotals,
    PerplexityConfig,
    first_scored,
    spread_windows,
    window_nll,
    window_nll_cached,
    window_starts,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model(OmegaConf.load(ROOT / "conf/model/tiny_random.yaml"), attention="sdpa")
    return model.eval(), tokenizer


@pytest.mark.parametrize(("n", "ctx", "stride"), [(1000, 128, 128), (1000, 128, 32), (1000, 128, 100), (128, 128, 64)])
def test_windows_score_every_covered_token_once(n, ctx, stride):
    starts = window_starts(n, ctx, stride)
    assert starts and all(s + ctx <= n for s in starts)
    scored = [s + p for i, s in enumerate(starts) for p in range(first_scored(i, ctx, stride), ctx)]
    assert sorted(scored) == list(range(1, starts[-1] + ctx))


def test_window_budget_is_spread_round_robin_over_documents():
    starts = [[0, 10, 20], [0], [0, 10]]
    assert spread_windows(starts, 4) == [(0, 0, 0), (0, 1, 10), (1, 0, 0), (2, 0, 0)]
    assert len(spread_windows(starts, None)) == 6


def test_chunked_loss_equals_hugging_face_loss(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids[None], labels=ids[None]).loss.double() * (len(ids) - 1)
    nll = window_nll(model, ids, first=1, chunk=37)
    assert nll.shape == (199,)
    torch.testing.assert_close(nll.double().sum(), expected, rtol=1e-5, atol=1e-4)
    # scoring only the new tokens of a later window is the tail of the same per-token losses
    torch.testing.assert_close(window_nll(model, ids, first=150, chunk=16), nll[149:])


@pytest.mark.parametrize(("prefill", "chunk"), [(64, 32), (100, 7), (200, 50)])
def test_cached_mode_matches_one_forward_for_the_stock_model(tiny, prefill, chunk):
    model, _ = tiny
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        window_nll_cached(model, ids, first=10, chunk=chunk, prefill=prefill),
        window_nll(model, ids, first=10, chunk=chunk),
        rtol=1e-4,
        atol=1e-4,
    )


def test_cached_mode_tells_dynamic_from_consistent_ntk(tiny):
    """Past the trained length (128), dynamic NTK's cached keys keep stale bases; consistent NTK's do not."""
    model, _ = tiny
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(2))
    results = {}
    for rope in ("dynamic_ntk", "consistent_ntk"):
        enhance_long.apply(model, rope=rope, logn=False, alpha=4.0, bucket=1)
        try:
            results[rope] = (window_nll(model, ids, 1, 64), window_nll_cached(model, ids, 1, 64, 128))
        finally:
            enhance_long.remove(model)
    full, cached = results["consistent_ntk"]
    torch.testing.assert_close(cached, full, rtol=1e-3, atol=1e-3)
    full, cached = results["dynamic_ntk"]
    assert (cached[128:] - full[128:]).abs().max() > 1e-4


def test_bucket_totals_add_up():
    totals = NLLTotals(ctx=16, buckets=4)
    totals.add(torch.arange(1, 16, dtype=torch.float32), torch.arange(1, 16))
    row = totals.row()
    assert row["tokens"] == 15 and sum(b["tokens"] for b in row["buckets"]) == 15
    assert [b["start"] for b in row["buckets"]] == [0, 4, 8, 12]
    assert row["buckets"][0]["tokens"] == 3  # positions 1..3: position 0 is never a label
    assert math.isclose(row["ppl"], math.exp(sum(range(1, 16)) / 15))
    assert math.isclose(row["buckets"][0]["ppl"], math.exp((1 + 2 + 3) / 3))


def _env(tiny, tmp_path, **task):
    model, tokenizer = tiny
    for i, n in enumerate((700, 300, 40)):
        (tmp_path / f"doc{i}.txt").write_text("".join(chr(97 + (i * 7 + k * k) % 26) for k in range(n)))
    cfg = OmegaConf.merge(OmegaConf.structured(PerplexityConfig), task)
    data = OmegaConf.create({"name": "local", "source": "local", "path": str(tmp_path), "text_field": "text"})
    return TaskEnv(model, tokenizer, cfg, data, tmp_path, progress=False)


def test_measure_rows_per_document_and_aggregate(tiny, tmp_path):
    env = _env(tiny, tmp_path, max_windows=None, stride=64, buckets=4)
    rows = TASK.measure(env, {"ctx": 128})
    docs, total = rows[:-1], rows[-1]
    assert [r["doc"] for r in docs] == ["doc0.txt", "doc1.txt"] and total["doc"] == "all"
    assert total["skipped"] == 1  # doc2 is shorter than ctx
    for row in docs:
        windows = row["windows"]
        assert row["tokens"] == 127 + 64 * (windows - 1) and row["ctx"] == 128
    assert total["tokens"] == sum(r["tokens"] for r in docs)
    assert math.isclose(total["ppl"], math.exp(sum(r["nll"] for r in docs) / total["tokens"]))
    assert len(total["buckets"]) == 4 and total["buckets"][-1]["tokens"] > total["buckets"][0]["tokens"]


def test_measure_honours_the_window_budget_and_mode(tiny, tmp_path):
    sliding = TASK.measure(_env(tiny, tmp_path, max_windows=1), {"ctx": 128})
    assert [r["doc"] for r in sliding] == ["doc0.txt", "all"] and sliding[-1]["tokens"] == 127
    cached = TASK.measure(_env(tiny, tmp_path, max_windows=1, mode="cached", chunk=32), {"ctx": 128})
    assert math.isclose(cached[-1]["ppl"], sliding[-1]["ppl"], rel_tol=1e-4)


def test_side_measures_score_the_same_windows_the_tail_alone_and_through_the_cache(tiny, tmp_path):
    model, _ = tiny
    env = _env(tiny, tmp_path, max_windows=2, tail_at=[128], tail_tokens=32, cached_at=[128], chunk=40)
    rows = TASK.measure(env, {"ctx": 128})
    corpus, windows = TASK.windows_for(env, 128)
    for row, (doc, _, start) in zip(rows, windows, strict=False):
        ids = corpus.docs[doc].ids[start : start + 128]
        full = window_nll(model, ids, 1, 64)
        assert math.isclose(row["tail_ppl"], math.exp(full[-31:].double().mean()), rel_tol=1e-6)
        alone = window_nll(model, ids[-32:], 1, 64)
        assert row["tail_alone_tokens"] == row["tail_tokens"] == 31
        assert math.isclose(row["tail_alone_ppl"], math.exp(alone.double().mean()), rel_tol=1e-6)
        assert math.isclose(row["cached_ppl"], math.exp(full.double().mean()), rel_tol=1e-4)  # stock: the same
    assert rows[-1]["doc"] == "all" and rows[-1]["cached_tokens"] == sum(r["cached_tokens"] for r in rows[:-1])
    plain = TASK.measure(_env(tiny, tmp_path, max_windows=2), {"ctx": 128})
    assert "tail_ppl" not in plain[-1] and "cached_ppl" not in plain[-1]


def test_cached_for_dynamic_runs_the_cached_forward_only_where_the_frequencies_follow_the_length(tiny, tmp_path):
    model, _ = tiny
    side = {"max_windows": 1, "cached_at": [128], "cached_for": "dynamic", "chunk": 40}
    stock = TASK.measure(_env(tiny, tmp_path, **side), {"ctx": 128})
    assert all(r["cached_same"] and "cached_ppl" not in r for r in stock)  # the stock rotary: exact either way
    enhance_long.apply(model, rope="dynamic_ntk", train_len=64, logn=False)
    try:
        dynamic = TASK.measure(_env(tiny, tmp_path, **side), {"ctx": 128})
    finally:
        enhance_long.remove(model)
    assert "cached_same" not in dynamic[-1] and dynamic[-1]["cached_ppl"] != pytest.approx(dynamic[-1]["ppl"])


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"cached_for": "some"}, "task.cached_for=some is unknown; choose all or dynamic"),
        ({"tail_at": [256]}, "task.tail_at has 256, which is not one of the lengths [128]"),
        ({"cached_at": [64]}, "task.cached_at has 64, which is not one of the lengths [128]"),
        ({"tail_at": [128], "tail_tokens": 128}, "task.tail_tokens=128 must be between 2 and the tail_at length 128"),
    ],
)
def test_side_measures_at_lengths_the_job_does_not_measure_are_refused(tiny, tmp_path, task, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TASK.check(_env(tiny, tmp_path, **task).cfg, [128])


def test_no_long_enough_document_is_a_one_line_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="no document of data=local has min_tokens=4096") as error:
        TASK.measure(_env(tiny, tmp_path), {"ctx": 4096})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("rope", "knobs"), [("none", {}), ("consistent_ntk", {"bucket": 16}), ("self_extend", {"window": 32, "group": 2})]
)
def test_shorter_lengths_are_scored_from_one_longer_forward_when_exact(tiny, tmp_path, rope, knobs):
    model, _ = tiny
    enhance_long.apply(model, rope=rope, logn=True, train_len=64, **knobs)
    try:
        alone = [TASK.measure(_env(tiny, tmp_path, max_windows=2), {"ctx": ctx})[-1] for ctx in (96, 192, 256)]
        env = _env(tiny, tmp_path, max_windows=2)
        TASK.prepare(env, [{"ctx": 256}, {"ctx": 96}, {"ctx": 192}])
        shared = [TASK.measure(env, {"ctx": ctx})[-1] for ctx in (96, 192, 256)]
    finally:
        enhance_long.remove(model)
    # window 0 of each document starts at 0 for every length: one forward of 256 tokens per document scores it
    assert sorted(env.cache["perplexity.losses"]) == [("doc0.txt", 0, 256), ("doc1.txt", 0, 256)]
    assert [row.get("from_ctx") for row in shared] == [256, 256, None]
    for one, other in zip(alone, shared, strict=True):
        assert one["tokens"] == other["tokens"]
        assert math.isclose(one["ppl"], other["ppl"], rel_tol=1e-5)


def test_length_dependent_frequencies_never_share_a_forward(tiny, tmp_path):
    model, _ = tiny
    enhance_long.apply(model, rope="dynamic_ntk", train_len=64)
    try:
        env = _env(tiny, tmp_path, max_windows=1)
        TASK.prepare(env, [{"ctx": 96}, {"ctx": 256}])
        short = TASK.measure(env, {"ctx": 96})[-1]
        longer = TASK.measure(env, {"ctx": 256})[-1]
    finally:
        enhance_long.remove(model)
    assert "from_ctx" not in short
    assert sorted(env.cache["perplexity.losses"]) == [("doc0.txt", 0, 96), ("doc0.txt", 0, 256)]
    assert not math.isclose(short["ppl"], longer["ppl"], rel_tol=1e-3)
