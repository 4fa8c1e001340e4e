"""Methods that remap relative positions beyond a window: Self-Extend, ReRoPE and leaky ReRoPE.

Each keeps exact positions for keys within ``window`` tokens of the query and gives farther keys a second,
"far" view: the query at position ``qf(i)`` and the key at ``kf(j)``, so their relative position is
``qf(i) - kf(j)``. Both views' scores are merged before one softmax:

    score(i, j) = q_i . k_j                    if i - j < window   (exact RoPE)
                = q_i@qf(i) . k_j@kf(j)        otherwise           (far view)

* Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"): ``qf(i) = i // G + W - W // G``, ``kf(j) = j // G``:
  far keys are grouped G at a time and the query is shifted so both views meet at the window's edge.
* ReRoPE (Su 2023): ``qf(i) = w``, ``kf(j) = 0``: every far key sits at relative position exactly w.
* Leaky ReRoPE: ``qf(i) = w + (i - w) / k``, ``kf(j) = j / k``: far relative positions grow with slope 1/k,
  ``w + (i - j - w) / k``, so they stay inside the trained range for k >= (L - w) / (T - w).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from enhance_long.methods.pieces import Merged, attend, fused
from enhance_long.methods.rotation import rotated, working_dtype

PositionMap = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def self_extend_positions(group: int, window: int) -> PositionMap:
    def far(q_pos: torch.Tensor, k_pos: torch.Tensor):
        return q_pos // group + (window - window // group), k_pos // group

    return far


def rerope_positions(window: int) -> PositionMap:
    def far(q_pos: torch.Tensor, k_pos: torch.Tensor):
        return torch.full_like(q_pos, window), torch.zeros_like(k_pos)

    return far


def leaky_rerope_positions(window: int, leak: float) -> PositionMap:
    def far(q_pos: torch.Tensor, k_pos: torch.Tensor):
        return window + (q_pos.double() - window) / leak, k_pos.double() / leak

    return far


def position_move(from_pos: torch.Tensor, to_pos: torch.Tensor, inv_freq: torch.Tensor, dtype=torch.float32):
    """cos and sin (batch, seq, dim/2) in ``dtype`` that turn vectors rotated at ``from_pos`` into vectors rotated at
    ``to_pos``. The angle difference is formed in float64 so fractional positions (leaky ReRoPE) stay exact enough.
    """
    angle = (to_pos.double() - from_pos.double())[..., None] * inv_freq.double()
    return angle.cos().to(dtype), angle.sin().to(dtype)


def move_positions(x: torch.Tensor, from_pos: torch.Tensor, to_pos: torch.Tensor, inv_freq: torch.Tensor):
    """A copy of ``x`` (batch, heads, seq, dim), rotated at ``from_pos`` (batch, seq), re-rotated to ``to_pos``."""
    return rotated(x, *position_move(from_pos, to_pos, inv_freq, working_dtype(x.dtype)))


def far_view_moves(n: int, kv: int, far_positions: PositionMap, inv_freq: torch.Tensor, dtype=torch.float32):
    """The (query, key) :func:`position_move` pairs into the far view when ``n`` queries end a run of ``kv``
    contiguous positions from 0: what :func:`two_view_pieces` applies, the same in every layer of a forward."""
    q_pos = torch.arange(kv - n, kv, device=inv_freq.device)[None]
    k_pos = torch.arange(kv, device=inv_freq.device)[None]
    q_far_pos, k_far_pos = far_positions(q_pos, k_pos)
    return position_move(q_pos, q_far_pos, inv_freq, dtype), position_move(k_pos, k_far_pos, inv_freq, dtype)


def two_view_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    far_positions: PositionMap,
    window: int,
    inv_freq: torch.Tensor,
    scaling: float,
    allowed: Callable[[int, int], torch.Tensor],
    max_block_elements: int = 1 << 25,
) -> torch.Tensor:
    """Attention whose scores come from the exact view within ``window`` and the far view beyond it.

    ``query`` (batch, heads, q, dim) and ``key``/``value`` (batch, kv_heads, kv, dim) are rotated at their exact
    positions ``q_pos`` (batch or 1, q) and ``k_pos`` (batch or 1, kv). ``allowed(start, end)`` gives the
    boolean mask (batch or 1, 1, end - start, kv) of the keys queries start..end-1 may see (causal, padding).
    Queries are processed in blocks so at most ``max_block_elements`` scores exist at once: memory grows with
    the number of keys, never with keys x queries. Returns (batch, q, heads, dim), as transformers' backends do.
    """
    q_far_pos, k_far_pos = far_positions(q_pos, k_pos)
    query_far = move_positions(query, q_pos, q_far_pos, inv_freq)
    key_far = move_positions(key, k_pos, k_far_pos, inv_freq)
    groups = query.shape[1] // key.shape[1]
    key, key_far, value = (t.repeat_interleave(groups, dim=1) for t in (key, key_far, value))
    batch, heads, q_len, _ = query.shape
    block = max(1, max_block_elements // max(1, batch * heads * key.shape[-2]))
    outputs = []
    for start in range(0, q_len, block):
        end = min(start + block, q_len)
        near = torch.matmul(query[:, :, start:end], key.transpose(-1, -2))
        far = torch.matmul(query_far[:, :, start:end], key_far.transpose(-1, -2))
        distance = q_pos[:, start:end, None] - k_pos[:, None, :]
        scores = torch.where((distance < window)[:, None], near, far).to(working_dtype(query.dtype)) * scaling
        scores = scores.masked_fill(~allowed(start, end), float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(value.dtype)
        outputs.append(torch.matmul(weights, value))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def two_view_pieces(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    far_positions: PositionMap,
    window: int,
    inv_freq: torch.Tensor,
    scaling: float,
    block: int = 256,
    moves: tuple | None = None,
) -> torch.Tensor:
    """:func:`two_view_attention` for the common case, causal with no padding: query row r at position
    ``p0 + r`` and key slot j at position j (``p0 = kv - q``), built from kernel calls merged by log-sum-exp.

    Queries go in blocks of ``L = min(block, window)`` rows; a block at positions [a, b) reads keys

        [0, a-W+1)          far view, every query                     one unmasked call
        [a-W+1, b-W)        far for j <= P-W (a causal square once the first row is dropped),
                            near for the rest (a causal square once rows and keys are reversed)
        [b-W, a)            near view, every query                    one unmasked call
        [a, b)              near view, causal                         one causal square

    (ranges clipped at 0), so no call needs a mask. The CPU kernel computes every score of a causal square up to
    512 keys wide (its key tile) and masks half, so the three squares cost about ``1.5 * L`` wasted scores per
    row: smaller blocks waste less, while the unmasked calls want enough rows for the kernel's largest query
    tiles (256 rows per key head from 768 stacked rows on, see :func:`attend`). Of 128, 256 and 512 rows, 256
    ran fastest at 4k and 8k tokens. ``moves``: :func:`far_view_moves` of this shape, when the caller keeps them
    across layers.
    """
    heads, n, kv = query.shape[1], query.shape[-2], key.shape[-2]
    p0 = kv - n
    to_query, to_key = moves or far_view_moves(n, kv, far_positions, inv_freq, working_dtype(query.dtype))
    query_far, key_far = rotated(query, *to_query), rotated(key, *to_key)
    if key.shape[1] != heads and not fused(query):  # once per layer rather than once per call
        key, key_far, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, key_far, value))
    output = query.new_empty(query.shape[0], n, heads, value.shape[-1], dtype=working_dtype(query.dtype))
    step = max(1, min(block, window))
    for s in range(0, n, step):
        e = min(s + step, n)
        a, b = p0 + s, p0 + e
        lo, hi = max(0, a - window + 1), max(0, b - window)  # the mixed strip [lo, hi)
        near, far = query[:, :, s:e], query_far[:, :, s:e]
        merged = Merged(
            attend(near, key[:, :, a:b], value[:, :, a:b], scaling, causal=True), output[:, s:e].transpose(1, 2)
        )
        if a > hi:
            merged.add(attend(near, key[:, :, hi:a], value[:, :, hi:a], scaling))
        if lo > 0:
            merged.add(attend(far, key_far[:, :, :lo], value[:, :, :lo], scaling))
        if hi > lo:
            # far: position P reads strip keys j <= P - W, i.e. rows from max(a, lo + W) on, key t <= row t
            first = max(a, lo + window) - a
            merged.add(
                attend(far[:, :, first:], key_far[:, :, lo:hi], value[:, :, lo:hi], scaling, True), slice(first, None)
            )
            # near: rows a .. b-2 read strip keys j > P - W; reversed, row t reads keys t' <= t
            rows = e - s - 1
            reversed_output, lse = attend(
                near[:, :, :rows].flip(2), key[:, :, lo:hi].flip(2), value[:, :, lo:hi].flip(2), scaling, True
            )
            merged.add((reversed_output.flip(2), lse.flip(2)), slice(0, rows))
        merged.merge()
    return output.to(value.dtype)
