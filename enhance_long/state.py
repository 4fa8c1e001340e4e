"""What a patched model carries: its validated settings, and the plan of the forward in flight.

``patch.apply`` builds a :class:`PatchState` per model and hangs it on every attention layer; the decoder's
pre-hook writes a :class:`ForwardPlan` into it once per forward, and the attention function (``attention.py``)
reads that plan in every layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from enhance_long.consistent import RotatedKeys, Segment
from enhance_long.methods.catalog import Method, Rope
from enhance_long.methods.relative import Views


@dataclass
class Settings:
    """A validated request: what ``apply`` will install."""

    method: Method
    knobs: dict[str, Any]
    logn: bool
    train_len: int
    logn_len: int


@dataclass
class ForwardPlan:
    """What the pre-hook derives once per forward and every attention layer reuses."""

    positions: torch.Tensor  # (batch or 1, q_len) position ids of this forward's queries
    seq_len: int  # largest position + 1
    query_scale: torch.Tensor | None  # (batch or 1, 1, q_len, 1) LogN factors, None when all are 1
    rope: Rope | None  # the frequencies the rotary embedding uses (None: consistent methods rotate in attention)
    segments: list[Segment] = field(default_factory=list)  # consistent methods: query runs of constant lengths
    lengths: torch.Tensor | None = None  # consistent methods: (batch or 1, q_len) each query's scheduled length
    ropes: dict[int, Rope] = field(default_factory=dict)  # consistent methods: length -> frequencies
    copies: dict[int, RotatedKeys] | None = None  # consistent methods: the cache's rotated keys, per layer
    memo: dict = field(default_factory=dict)  # rotations and masks shared across layers

    def remembered(self, key, make: Callable[[], Any]) -> Any:
        """``memo[key]``, made by ``make()`` the first time a layer of this forward asks for it."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


@dataclass
class PatchState:
    """What ``apply`` changed on one model, and the plan of the forward in flight."""

    settings: Settings
    backend: str
    stock_attn: str
    rotary_owner: nn.Module
    stock_rotary: nn.Module
    stock_inv_freq: torch.Tensor
    stock_attention_scaling: float
    frequencies: Callable[[int, torch.device], Rope]
    views: Views | None = None  # the position views of a remapping method
    hook: Any = None
    plan: ForwardPlan | None = None
    rotated_keys: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # cache -> copies
