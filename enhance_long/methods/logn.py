"""LogN attention scaling.

A query at 1-based position ``i`` past the trained length ``T`` has its logits multiplied by ``log(i) / log(T)``,
which keeps the attention entropy near what the model saw in training as the number of keys grows:

    s(i) = log(i) / log(T)   if i > T
    s(i) = 1                 otherwise

Scaling the query by ``s(i)`` scales every logit of that query by ``s(i)``, so it works with fused kernels
(sdpa, flash, flex) that never expose the logits.
"""

from __future__ import annotations

import math

import torch


def logn_scale(positions: torch.Tensor, train_len: int) -> torch.Tensor:
    """Per-query LogN factors for 0-based ``positions`` (any shape); float32, same shape."""
    one_based = positions.to(torch.float32) + 1.0
    return torch.where(one_based > train_len, one_based.log() / math.log(train_len), torch.ones_like(one_based))
