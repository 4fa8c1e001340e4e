"""The consistent methods (``consistent_ntk``, ``dynamic_yarn``): each query and every key it reads share a base.

Schedules. With ``schedule="per_query"`` (the default) the query at 0-based position ``i`` of a row, and every key
it attends to, use the frequencies of length ``L = scheduled_length(i + 1)``: the output at ``i`` depends only on
tokens ``0..i``, so any way of feeding the text (one forward, chunks, token by token) gives the same result. With
``schedule="per_forward"`` (the original enhance-long and NormXU's Consistent-DynamicNTKRoPE) every query and key of
a row in one forward use the length of that row's longest position, and each decoding step re-rotates the whole
cache to its own length: a prompt is then scored as transformers' dynamic NTK scores it, while generation keeps
query and keys on one base.

Rows never share a schedule: a row's lengths come from its own position ids, so a row of a padded batch is
computed exactly as the row alone.

Keys before RoPE. The rotary embedding of a patched model hands the attention layers unrotated queries and keys
(:func:`identity_rotation`), so a ``DynamicCache`` stores keys before RoPE. :class:`RotatedKeys` keeps beside it
the copy the attention reads: every cached key rotated to each row's current frequencies, derived from the
unrotated key in one rounding whenever a row's frequencies change and extended by each forward's new keys. Keys
therefore never accumulate rounding, however many times the base moves (a re-rotation in place would round once
per move: in bfloat16, 30 moves leave keys ~30x further from float64 than one fresh rotation). The price is memory:
the cache holds its keys twice (pre-RoPE and rotated), i.e. 1.5x the stock KV cache, plus at most 1/8 slack.

The copy follows the cache: the pre-hook checks, for every layer, that the cache still holds the key tensor the copy
was derived from; anything that replaced it (beam reordering, cropping, batch selection, offloading) makes the
copy be derived again from the cache's own keys.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from enhance_long.methods.catalog import Rope
from enhance_long.methods.rotation import as_pairs, turned

ROTATION_MEMO_BYTES = 1 << 30  # key turns kept per forward; a 16k forward at the default bucket holds about 0.1 GiB


class Segment(NamedTuple):
    """Queries ``start..end-1`` of a forward, whose rows each use one length throughout (``lengths[r]``)."""

    start: int
    end: int
    lengths: tuple[int, ...]  # per row of the positions (1 entry: every batch row)


def query_lengths(
    positions: torch.Tensor, train_len: int, bucket: int, schedule: str, real: torch.Tensor | None = None
) -> torch.Tensor:
    """The scheduled length of every query: (rows, q) int64 for 0-based ``positions`` (rows, q).

    Up to ``train_len`` it is ``train_len`` (the stock frequencies); past it ``L`` rounded up to
    ``train_len + k * bucket``, with ``L = position + 1`` per query, or for ``per_forward`` the row's largest position
    + 1 among its real tokens (``real``: the queries' attention mask, so padding does not lengthen a row); see
    :func:`enhance_long.methods.ntk.scheduled_length`."""
    lengths = positions.long() + 1
    if schedule == "per_forward":
        if real is not None and bool(real.any(dim=-1).all()):
            lengths = lengths.masked_fill(~real, 0)
        lengths = lengths.max(dim=-1, keepdim=True).values.expand(-1, positions.shape[-1])
    past = (lengths - train_len).clamp(min=0)
    return train_len + (past + bucket - 1) // bucket * bucket


def segments(lengths: torch.Tensor) -> list[Segment]:
    """Runs of consecutive queries over which no row's length changes."""
    q_len = lengths.shape[-1]
    changes = (lengths[:, 1:] != lengths[:, :-1]).any(dim=0).nonzero().flatten().add(1).tolist()
    starts = [0, *changes]
    ends = [*changes, q_len]
    firsts = lengths[:, starts].T.tolist()
    return [Segment(s, e, tuple(first)) for s, e, first in zip(starts, ends, firsts, strict=True)]


def identity_rotation(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos = 1 and sin = 0, shaped (batch, seq, 1) to broadcast where transformers' rotary embeddings return
    (batch, seq, dim): ``apply_rotary_pos_emb`` then leaves queries and keys exactly as projected."""
    shape = (*position_ids.shape, 1)
    return x.new_ones(()).expand(shape), x.new_zeros(()).expand(shape)


def key_positions(positions: torch.Tensor, n_before: int) -> torch.Tensor:
    """Positions (rows, n_before + q) of the keys a forward attends to: the queries' own positions for its new
    keys, and for the ``n_before`` cached ones the positions right before each row's first query (a cache holds a
    row's tokens contiguously, as ``generate`` feeds them; cached padding gets position 0 and is masked anyway)."""
    if n_before == 0:
        return positions
    before = positions[:, :1] - n_before + torch.arange(n_before, device=positions.device)
    return torch.cat((before.clamp(min=0), positions), dim=-1)


def turns(positions: torch.Tensor, lengths: torch.Tensor, ropes: dict[int, Rope]) -> torch.Tensor:
    """``scale * (cos + i sin)`` of ``position * inv_freq`` (rows, n, dim/2), each element with the frequencies of its
    length: ``lengths`` (rows, n) or (rows, 1). Angles are formed as the model forms them (float32 products)."""
    distinct = sorted(ropes)
    table = torch.stack([ropes[length].inv_freq for length in distinct]).to(positions.device)
    scales = torch.tensor([ropes[length].scale for length in distinct], device=positions.device)
    index = torch.searchsorted(torch.tensor(distinct, device=positions.device), lengths)
    angle = positions.float()[..., None] * table[index]
    cos, sin = angle.cos(), angle.sin()  # as transformers' rotary embeddings form them, then scaled alike
    if not bool((scales == 1).all()):
        scale = scales[index][..., None]
        cos, sin = cos * scale, sin * scale
    return torch.complex(cos, sin)


class TurnMemo:
    """Key turns shared by the layers of one forward (every layer rotates the same slots to the same lengths), kept
    while they fit ``limit`` bytes: bucket=1 over a long input forms thousands of them, which together would take
    tens of GiB, so beyond the budget each layer forms them anew."""

    def __init__(self, limit: int):
        self.turns: dict = {}
        self.bytes = 0
        self.limit = limit

    def get(self, key, make) -> torch.Tensor:
        turn = self.turns.get(key)
        if turn is None:
            turn = make()
            size = turn.numel() * turn.element_size()
            if self.bytes + size <= self.limit:
                self.turns[key] = turn
                self.bytes += size
        return turn


class RotatedKeys:
    """One layer's keys rotated to each batch row's frequencies, laid out by pairs, derived from unrotated keys.

    ``buffer[:, :, :valid]`` holds slots ``0..valid-1``; row ``r`` is rotated with the frequencies of length
    ``lengths[r]``. :meth:`at` brings rows to new lengths (deriving them again from the unrotated keys: one rounding,
    whatever happened before) and extends the valid slots.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.valid = 0
        self.lengths: tuple[int, ...] = ()
        self.source: weakref.ref | None = None  # the cache's key tensor this copy follows

    def follows(self, keys) -> bool:
        """Whether this copy was derived from exactly ``keys`` (the cache layer's key tensor)."""
        return self.source is not None and self.source() is keys

    def forget(self) -> None:
        self.valid, self.lengths, self.source = 0, (), None

    def at(
        self,
        keys: torch.Tensor,
        key_pos: torch.Tensor,
        lengths: tuple[int, ...],
        end: int,
        ropes: dict[int, Rope],
        memo: TurnMemo,
        slack: bool = False,
    ) -> torch.Tensor:
        """Keys ``0..end-1`` of ``keys`` (batch, kv_heads, n, dim; unrotated) rotated per row to ``lengths``, as a view
        (batch, kv_heads, end, dim) in ``keys.dtype``. ``key_pos`` (rows, n) are their positions; ``memo`` keeps the
        turns for the other layers of the forward. ``slack``: leave room to grow (a cache's copy)."""
        batch = keys.shape[0]
        target = lengths * batch if len(lengths) == 1 else lengths
        self.valid = min(self.valid, end) if self.lengths else 0
        self._reserve(keys, end, slack)
        changed = [r for r in range(batch) if not self.lengths or self.lengths[r] != target[r]]
        if changed and self.valid:
            self._derive(keys, key_pos, target, changed, 0, self.valid, ropes, memo)
        self.lengths = target
        if end > self.valid:
            self._derive(keys, key_pos, target, list(range(batch)), self.valid, end, ropes, memo)
            self.valid = end
        return self.buffer[:, :, :end]

    def _reserve(self, keys: torch.Tensor, end: int, slack: bool) -> None:
        buffer = self.buffer
        fits = buffer is not None and buffer.shape[:2] == keys.shape[:2] and buffer.dtype == keys.dtype
        if fits and buffer.device == keys.device and buffer.shape[2] >= end:
            return
        capacity = end + (max(256, end // 8) if slack else 0)
        grown = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        if fits and self.valid:
            grown[:, :, : self.valid] = buffer[:, :, : self.valid]
        else:
            self.valid, self.lengths = 0, ()
        self.buffer = grown

    def _derive(self, keys, key_pos, target, rows, start, end, ropes, memo: TurnMemo) -> None:
        """Slots ``start..end-1`` of ``rows``, rotated from the unrotated keys to each row's length."""
        every = len(rows) == keys.shape[0]
        lengths = tuple(target[r] for r in rows)
        shared = lengths[:1] if len(set(lengths)) == 1 else lengths

        def make() -> torch.Tensor:
            pos = key_pos[:, start:end] if key_pos.shape[0] == 1 else key_pos[rows, start:end]
            return turns(pos, torch.tensor(shared, device=pos.device)[:, None], ropes)

        turn = memo.get(("key turn", None if every and len(shared) == 1 else tuple(rows), shared, start, end), make)
        source = keys[:, :, start:end] if every else keys[rows, :, start:end]
        rotated = turned(as_pairs(source), turn, keys.dtype)
        if every:
            self.buffer[:, :, start:end] = rotated
        else:
            self.buffer[rows, :, start:end] = rotated


def validate_copies(copies: dict[int, RotatedKeys], cache) -> None:
    """Forget every layer's copy whose cache layer no longer holds the key tensor it was derived from."""
    layers = getattr(cache, "layers", [])
    for index, copy in copies.items():
        keys = getattr(layers[index], "keys", None) if index < len(layers) else None
        if not copy.follows(keys):
            copy.forget()
