"""Methods that score (query, key) pairs at remapped positions: Self-Extend, ReRoPE, leaky ReRoPE, STRING, Dual Chunk
Attention, LM-Infinite and attention sinks.

Each method is a set of *views*. A view owns a region of the causal pairs -- for a query at position ``i``, the keys
at positions ``lo(i) <= j < hi(i)`` -- and scores them with the query rotated at ``qv(i)`` and the key at ``kv(j)``,
so their relative position is ``qv(i) - kv(j)``. Regions never overlap; pairs that no view owns are not attended
(LM-Infinite and attention sinks leave the middle of a long context out). All views share one softmax:

    score(i, j) = q_i@qv(i) . k_j@kv(j)     for the view whose region holds (i, j); no view: masked

Positions are true token positions (0-based). ``qv``/``kv`` default to the positions the rotary embedding rotated
at: the true ones, or for Dual Chunk Attention ``p mod s`` (its keys are cached at those). The maps:

* Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"): exact within ``W``; beyond it ``qv(i) = i // G + W - W // G``,
  ``kv(j) = j // G``: far keys grouped G at a time, the query shifted so both views meet at the window's edge.
* ReRoPE (Su 2023): exact within ``w``; beyond it ``qv(i) = w``, ``kv(j) = 0``: every far key at distance w.
* Leaky ReRoPE: beyond ``w``, ``qv(i) = w + (i - w) / k``, ``kv(j) = j / k``: far distances ``w + (i - j - w) / k``.
* STRING (An et al. 2024): exact within ``S`` (shifted_offset); beyond it ``qv(i) = i - S + W`` (local_value):
  far distances ``i - j - S + W``, the well-trained small ones shifted over the rarely trained large ones.
* Dual Chunk Attention (An et al. 2024): chunks of ``s = chunk_size - local_window`` aligned to position 0, keys at
  ``j mod s``; a query reads its own chunk at ``i mod s`` (exact), the previous chunk at ``min(s + i mod s,
  chunk_size)``, older chunks at ``min(2s - 1, chunk_size)`` (= chunk_size when s > local_window).
* LM-Infinite (Han et al. 2024, Lambda-shaped attention): exact within ``W``; beyond it only the first ``G`` keys,
  at distance ``W`` (ReRoPE's far view, restricted to ``j < G``); the rest is masked.
* Attention sinks (StreamingLLM, Xiao et al. 2024): exact within ``W``; beyond it only the first ``G`` (sink) keys,
  at the distance their cache slots have: the query sits at slot ``min(i, G + W - 1)``, sink ``j`` at slot ``j``.

:func:`two_view_attention` computes any method from masked score blocks (any mask, padding, positions);
:func:`two_view_pieces` assembles the common case -- causal, no padding, contiguous positions -- from fused kernel
calls merged by log-sum-exp (``pieces.py``), without building a mask or a score matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from enhance_long.methods.pieces import Merged, attend, fused
from enhance_long.methods.rotation import rotated, working_dtype

PositionFn = Callable[[torch.Tensor], torch.Tensor]  # positions -> positions (a view's rotation, a region's bound)


class Remap(NamedTuple):
    """Where a view rotates queries and keys, as functions of their true positions; None keeps the rotary's."""

    query: PositionFn | None = None
    key: PositionFn | None = None


class View(NamedTuple):
    """The keys ``lo(i) <= j < hi(i)`` of the query at position ``i`` (``hi(i) <= i + 1``), scored at ``remap``.

    ``lo`` and ``hi`` take a tensor of query positions and return key positions, unclipped (below 0 means none);
    within runs of queries each must be constant or grow by one per position (what :func:`plan_pieces` cuts at)."""

    lo: PositionFn
    hi: PositionFn
    remap: Remap = Remap()


class Views(NamedTuple):
    """A method's views (their regions cover each query's own key once), and what plain attention stands for."""

    views: tuple[View, ...]
    exact_below: int  # a forward whose positions are all below this scores every pair exactly: plain attention
    rotary: PositionFn | None = None  # positions the rotary embedding rotates at; None: the true positions


def _zero(i: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(i)


def within(window: int) -> View:
    """The exact view of the keys less than ``window`` tokens back (the query's own key included)."""
    return View(lambda i: i - window + 1, lambda i: i + 1)


def beyond(window: int, remap: Remap, keys_below: int | None = None) -> View:
    """The keys ``window`` or more tokens back (only those at positions below ``keys_below``, if given), at ``remap``."""
    if keys_below is None:
        return View(_zero, lambda i: i - window + 1, remap)
    return View(_zero, lambda i: torch.clamp(i - window + 1, max=keys_below), remap)


def beyond_window(window: int, far: Remap) -> Views:
    """Exact positions within ``window``, ``far`` beyond it (Self-Extend, ReRoPE, leaky ReRoPE, STRING)."""
    return Views((within(window), beyond(window, far)), exact_below=window)


def self_extend_positions(group: int, window: int) -> Remap:
    return Remap(lambda q: q // group + (window - window // group), lambda k: k // group)


def rerope_positions(window: int) -> Remap:
    return Remap(lambda q: torch.full_like(q, window), torch.zeros_like)


def leaky_rerope_positions(window: int, leak: float) -> Remap:
    return Remap(lambda q: window + (q.double() - window) / leak, lambda k: k.double() / leak)


def string_views(shifted_offset: int, local_value: int) -> Views:
    """STRING: exact below ``shifted_offset`` (S), beyond it the query moved back by ``S - local_value`` (W).

    Follows HKUNLP/STRING ``string_for_llama.py`` (``forward`` and ``string_flash_forward``; 216cc2f): queries
    rotated at i and at i - S + W, keys at j. Deliberate difference: the split is ``i - j < S`` exact, ``>= S``
    shifted in every forward, as its decoding branch does; its prefill runs the exact part as a flash window of S + 1
    keys and so also counts the key at distance exactly S there (it is in both parts). Its attention factor is
    :func:`~enhance_long.methods.temperature.constant_attention_scale`."""
    return beyond_window(shifted_offset, Remap(lambda q: q - (shifted_offset - local_value)))


def dual_chunk_views(chunk_size: int, local_window: int) -> Views:
    """Dual Chunk Attention: intra-chunk (exact), successive-chunk and inter-chunk views over chunks of
    ``s = chunk_size - local_window`` from position 0; the rotary embedding rotates at ``p mod s``.

    Follows HKUNLP/ChunkLlama ``chunkllama_attn_replace.py`` (2add4d7): ``ChunkLlamaRotaryEmbedding`` builds the
    key table at ``j mod s``, the intra query table at ``i mod s`` and the successive table at
    ``min(s + i mod s, chunk_size)``; ``forward`` gives a query chunk its own chunk (causal, intra), the previous one
    (successive) and everything before (inter, at the successive table's entry s - 1: ``min(2s - 1, chunk_size)``)
    and merges them by log-sum-exp, i.e. one softmax. Deliberate differences: any chunking of the input and any
    number of new tokens per forward follow the same grid (its decoding branch assumes one new token in the last
    chunk), and padded rows follow their own positions. Its temperature is
    :func:`~enhance_long.methods.temperature.chunk_attention_scale`."""
    s = chunk_size - local_window

    def start(i: torch.Tensor) -> torch.Tensor:  # the first position of i's chunk
        return i // s * s

    successive = Remap(lambda q: torch.clamp(q % s + s, max=chunk_size))
    inter = Remap(lambda q: torch.full_like(q, min(2 * s - 1, chunk_size)))
    views = (
        View(start, lambda i: i + 1),
        View(lambda i: start(i) - s, start, successive),
        View(_zero, lambda i: start(i) - s, inter),
    )
    return Views(views, exact_below=s, rotary=lambda p: p % s)


def lambda_views(window: int, n_global: int) -> Views:
    """LM-Infinite: exact within ``window``; beyond it the first ``n_global`` keys at distance ``window``, no others.

    Follows Glaciohound/LM-Infinite ``models/llama.py`` (``attn_forward_factory``, ``convert_llama_model``) and
    ``models/lambda_attention.py`` (``Lambda_Attention_Matrix``; a0ce64c): local branch ``i - j <= window - 1``
    at exact positions, global branch the first n_global keys outside it with the key unrotated and the query
    rotated by the distance limit, which ``convert_llama_model`` sets to the local branch size. No difference in the
    map; the official code ignores padding masks and grouped-query heads, which work here."""
    return Views((within(window), beyond(window, rerope_positions(window), n_global)), exact_below=window)


def sink_views(n_sink: int, window: int) -> Views:
    """Attention sinks: exact within ``window``; beyond it the first ``n_sink`` keys at their cache-slot distance
    (query at slot ``min(i, n_sink + window - 1)``, sink j at slot j), no others. Plain attention up to
    ``n_sink + window`` tokens, where nothing has been evicted yet.

    Follows mit-han-lab/streaming-llm ``streaming_llm/kv_cache.py`` (``StartRecentKVCache``) and
    ``streaming_llm/pos_shift/modify_llama.py`` (2e50426) as ``examples/eval_long_ppl.py`` runs them, one token at a
    time: the cache trimmed to the first start_size and last recent_size tokens before each token, keys rotated at
    their cache slot, the query at the next slot. ``window`` is recent_size + 1 (the query counts). Deliberate
    difference: one forward over many tokens gives each query that same cache (the official chat demo prefills a
    prompt with full attention and evicts between forwards only)."""
    slot = Remap(lambda q: torch.clamp(q, max=n_sink + window - 1))
    return Views((within(window), beyond(window, slot, n_sink)), exact_below=n_sink + window)


def position_move(from_pos: torch.Tensor, to_pos: torch.Tensor, inv_freq: torch.Tensor, dtype=torch.float32):
    """cos and sin (batch, seq, dim/2) in ``dtype`` that turn vectors rotated at ``from_pos`` into vectors rotated at
    ``to_pos``. The angle difference is formed in float64 so fractional positions (leaky ReRoPE) stay exact enough.
    """
    angle = (to_pos.double() - from_pos.double())[..., None] * inv_freq.double()
    return angle.cos().to(dtype), angle.sin().to(dtype)


def move_positions(x: torch.Tensor, from_pos: torch.Tensor, to_pos: torch.Tensor, inv_freq: torch.Tensor):
    """A copy of ``x`` (batch, heads, seq, dim), rotated at ``from_pos`` (batch, seq), re-rotated to ``to_pos``."""
    return rotated(x, *position_move(from_pos, to_pos, inv_freq, working_dtype(x.dtype)))


def _as_views(views: Views | Remap, window: int | None) -> Views:
    """The methods' views; or, Self-Extend's and ReRoPE's original form, the far view's ``Remap`` beyond ``window``."""
    return views if window is None else beyond_window(window, views)


def _rotary_positions(views: Views, pos: torch.Tensor) -> torch.Tensor:
    return pos if views.rotary is None else views.rotary(pos)


def two_view_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    views: Views | Remap,
    window: int | None = None,
    inv_freq: torch.Tensor | None = None,
    scaling: float = 1.0,
    allowed: Callable[[int, int], torch.Tensor] | None = None,
    max_block_elements: int = 1 << 25,
) -> torch.Tensor:
    """Attention whose scores come from each pair's view (named for Self-Extend's two; any number of views).

    ``query`` (batch, heads, q, dim) and ``key``/``value`` (batch, kv_heads, kv, dim) are rotated at the rotary
    positions of ``q_pos`` (batch or 1, q) and ``k_pos`` (batch or 1, kv). ``allowed(start, end)`` gives the
    boolean mask (batch or 1, 1, end - start, kv) of the keys queries start..end-1 may see (causal, padding).
    Queries are processed in blocks so at most ``max_block_elements`` scores exist at once: memory grows with
    the number of keys, never with keys x queries. Returns (batch, q, heads, dim), as transformers' backends do.
    """
    views = _as_views(views, window)
    q_from, k_from = _rotary_positions(views, q_pos), _rotary_positions(views, k_pos)
    groups = query.shape[1] // key.shape[1]
    scored = []
    for view in views.views:
        q = query if view.remap.query is None else move_positions(query, q_from, view.remap.query(q_pos), inv_freq)
        k = key if view.remap.key is None else move_positions(key, k_from, view.remap.key(k_pos), inv_freq)
        scored.append((q, k.repeat_interleave(groups, dim=1), view.lo(q_pos), view.hi(q_pos)))
    value = value.repeat_interleave(groups, dim=1)
    batch, heads, q_len, _ = query.shape
    block = max(1, max_block_elements // max(1, batch * heads * key.shape[-2]))
    keys_at = k_pos[:, None, :]
    outputs = []
    for start in range(0, q_len, block):
        end = min(start + block, q_len)
        scores = covered = None
        for q, k, lo, hi in reversed(scored):  # the first view's scores end on top
            view_scores = torch.matmul(q[:, :, start:end], k.transpose(-1, -2))
            owned = (lo[:, start:end, None] <= keys_at) & (keys_at < hi[:, start:end, None])
            if scores is None:
                scores, covered = view_scores, owned
            else:
                scores, covered = torch.where(owned[:, None], view_scores, scores), covered | owned
        scores = scores.to(working_dtype(query.dtype)) * scaling
        scores = scores.masked_fill(~(allowed(start, end) & covered[:, None]), float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(value.dtype)
        outputs.append(torch.matmul(weights, value))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


FULL, CAUSAL, FLIPPED = "full", "causal", "flipped"


class Piece(NamedTuple):
    """One kernel call of a block: view ``view``'s queries ``rows`` (of the block) over key slots ``keys``; ``kind``:
    every row sees every key (full), row t sees keys up to t (causal, top-left), or the same with rows and keys
    reversed (flipped: row t sees keys from t on, right-aligned)."""

    view: int
    kind: str
    rows: tuple[int, int]
    keys: tuple[int, int]


class PiecePlan(NamedTuple):
    """What :func:`two_view_pieces` runs for ``n`` queries ending ``kv`` contiguous positions from 0; the same in
    every layer of a forward. ``query_moves[v]``: cos/sin into view v's query positions (None: unmoved);
    ``key_moves[v]``: (first slot, cos, sin) into its key positions, over the slots it reads (None: unmoved)."""

    blocks: list[tuple[int, int, list[Piece]]]
    query_moves: list[tuple[torch.Tensor, torch.Tensor] | None]
    key_moves: list[tuple[int, torch.Tensor, torch.Tensor] | None]


def _slope(seq: list[int], s: int, e: int) -> int:
    return seq[s + 1] - seq[s] if e - s > 1 else 0


def _cuts(bounds: list[torch.Tensor], n: int) -> list[int]:
    """Rows where some bound stops being constant or stops growing by one per row (a chunk edge, a window reached)."""
    cuts = {0, n}
    for seq in bounds:
        step = torch.diff(seq)
        jumps = ((step != 0) & (step != 1)).nonzero().flatten() + 1
        turns = (step[1:] != step[:-1]).nonzero().flatten() + 1
        cuts.update(jumps.tolist(), turns.tolist())
    return sorted(cuts)


def _view_pieces(v: int, lo0: int, lo_slope: int, hi0: int, hi_slope: int, n: int, own: bool):
    """The pieces of view ``v`` over ``n`` rows whose bounds are ``lo0 + lo_slope * t`` and ``hi0 + hi_slope * t``
    (at most as many rows as the band is wide when both grow): (middle, upper ramp, lower ramp), each a Piece or
    None; for the view holding each row's own key (``own``) the upper ramp is the causal square of those keys.

        keys [L, top)                        every row (L: the largest lower bound, top: the smallest upper one)
        keys [hi0, hi0 + n - 1)              row t reads those below hi0 + t: causal once rows start at ``first``
        keys [lo0, lo0 + n - 1)              row t reads those from lo0 + t on: causal once reversed
    """
    low = max(lo0 + lo_slope * (n - 1), 0)
    upper = lower = None
    if own:  # hi = i + 1: the square of the rows' own keys, every row reading itself first
        top = hi0 - 1
        upper = Piece(v, CAUSAL, (0, n), (top, top + n))
    else:
        top = hi0
        k0, k1 = max(low, hi0), hi0 + n - 1
        if hi_slope and k1 > k0:
            upper = Piece(v, CAUSAL, (k0 - hi0 + 1, n), (k0, k1))
    middle = Piece(v, FULL, (0, n), (low, top)) if top > low else None
    k0, k1 = max(lo0, 0), lo0 + n - 1
    if lo_slope and k1 > k0:
        lower = Piece(v, FLIPPED, (0, n - 1), (k0, k1))
    return middle, upper, lower


def plan_pieces(n: int, kv: int, views: Views, inv_freq: torch.Tensor, dtype=torch.float32, block: int = 256):
    """The :class:`PiecePlan` of ``n`` queries at positions ``kv - n .. kv - 1`` over keys ``0 .. kv - 1``.

    Rows are cut where a view's bounds change form (a chunk edge, a capped region filling up) and into blocks of at
    most ``block`` rows and at most the width of any band whose both bounds grow, so each view's keys in a block are
    one unmasked call, one causal square at the top (which for the view holding each query's own key also gives
    every row a key, so it goes first) and one reversed causal square at the bottom: no call needs a mask. The CPU
    kernel computes every score of a causal square up to 512 keys wide (its key tile) and masks half, so smaller
    blocks waste less, while the unmasked calls want enough rows for the kernel's largest query tiles (256 rows per
    key head from 768 stacked rows on, see :func:`attend`); of 128, 256 and 512 rows, 256 ran fastest at 4k and 8k.
    """
    device = inv_freq.device
    p0 = kv - n
    q_pos = torch.arange(p0, kv, device=device)
    bounds = [(view.lo(q_pos), view.hi(q_pos)) for view in views.views]
    cuts = _cuts([b for pair in bounds for b in pair], n)
    lists = [(lo.tolist(), hi.tolist()) for lo, hi in bounds]
    blocks = []
    for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
        s = c0
        while s < c1:
            width = [hi[s] - lo[s] for lo, hi in lists if _slope(lo, c0, c1) and hi[s] > lo[s]]
            e = min(c1, s + max(1, min([block, *width])))
            blocks.append((s, e, _block_pieces(lists, s, e, p0)))
            s = e
    extents = [[kv, 0] for _ in views.views]
    for _, _, pieces in blocks:
        for piece in pieces:
            extent = extents[piece.view]
            extent[0], extent[1] = min(extent[0], piece.keys[0]), max(extent[1], piece.keys[1])
    q_from = _rotary_positions(views, q_pos)[None]
    query_moves, key_moves = [], []
    for view, (k0, k1) in zip(views.views, extents, strict=True):
        remap = view.remap
        query_moves.append(
            None if remap.query is None else position_move(q_from, remap.query(q_pos[None]), inv_freq, dtype)
        )
        if remap.key is None or k1 <= k0:
            key_moves.append(None)
            continue
        k_pos = torch.arange(k0, k1, device=device)[None]
        key_moves.append((k0, *position_move(_rotary_positions(views, k_pos), remap.key(k_pos), inv_freq, dtype)))
    return PiecePlan(blocks, query_moves, key_moves)


def _block_pieces(lists, s: int, e: int, p0: int) -> list[Piece]:
    """The pieces of rows ``s .. e-1``, merged in this order: the own view's square, then every view's unmasked
    keys, upper ramps and lower ramps (each in view order)."""
    n = e - s
    parts = []
    for v, (lo, hi) in enumerate(lists):
        own = hi[s] == p0 + s + 1 and (n == 1 or _slope(hi, s, e) == 1)
        parts.append((own, _view_pieces(v, lo[s], _slope(lo, s, e), hi[s], _slope(hi, s, e), n, own)))
    owners = [v for v, (own, _) in enumerate(parts) if own]
    if not owners:
        raise ValueError("no view holds the queries' own keys; every method needs one whose hi(i) is i + 1")
    first = parts[owners[0]][1][1]
    middles = [p[0] for _, p in parts]
    uppers = [p[1] for v, (_, p) in enumerate(parts) if v != owners[0]]
    lowers = [p[2] for _, p in parts]
    return [first, *(p for p in (*middles, *uppers, *lowers) if p is not None)]


def two_view_pieces(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    views: Views | Remap,
    window: int | None = None,
    inv_freq: torch.Tensor | None = None,
    scaling: float = 1.0,
    block: int = 256,
    plan: PiecePlan | None = None,
) -> torch.Tensor:
    """:func:`two_view_attention` for the common case, causal with no padding: query row r at position
    ``kv - q + r`` and key slot j at position j, from kernel calls merged by log-sum-exp (:func:`plan_pieces`).

    ``plan``: :func:`plan_pieces` of this shape, when the caller keeps it across layers. Returns (batch, q, heads,
    dim) in ``value``'s dtype.
    """
    views = _as_views(views, window)
    heads, n, kv = query.shape[1], query.shape[-2], key.shape[-2]
    plan = plan or plan_pieces(n, kv, views, inv_freq, working_dtype(query.dtype), block)
    queries = [query if move is None else rotated(query, *move) for move in plan.query_moves]
    keys = [(0, key) if move is None else (move[0], _rotated_keys(key, *move)) for move in plan.key_moves]
    if key.shape[1] != heads and not fused(query):  # once per layer rather than once per call
        groups = heads // key.shape[1]
        keys = [(start, k.repeat_interleave(groups, dim=1)) for start, k in keys]
        value = value.repeat_interleave(groups, dim=1)
    output = query.new_empty(query.shape[0], n, heads, value.shape[-1], dtype=working_dtype(query.dtype))
    for s, e, pieces in plan.blocks:
        first, *rest = (_attend_piece(piece, s, queries, keys, value, scaling) for piece in pieces)
        merged = Merged(first, output[:, s:e].transpose(1, 2))
        for piece, result in zip(pieces[1:], rest, strict=True):
            merged.add(result, slice(*piece.rows))
        merged.merge()
    return output.to(value.dtype)


def _rotated_keys(key: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotated(key[:, :, start : start + cos.shape[1]], cos, sin)


def _attend_piece(piece: Piece, s: int, queries, keys, value, scaling: float):
    (r0, r1), (k0, k1) = piece.rows, piece.keys
    q = queries[piece.view][:, :, s + r0 : s + r1]
    start, k = keys[piece.view]
    k, v = k[:, :, k0 - start : k1 - start], value[:, :, k0:k1]
    if piece.kind == FLIPPED:
        output, lse = attend(q.flip(2), k.flip(2), v.flip(2), scaling, True)
        return output.flip(2), lse.flip(2)
    return attend(q, k, v, scaling, piece.kind == CAUSAL)
