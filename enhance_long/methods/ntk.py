"""RoPE frequency schedules: plain, linear interpolation, static NTK and dynamic NTK (pure functions of lengths).

Notation: ``base`` is the model's rope_theta, ``dim`` the rotary dimension (head_dim times the partial rotary
factor), ``T`` the trained context length, ``L`` the current sequence length (largest position + 1).

    inv_freq_j = 1 / base^(2j / dim),  j = 0 .. dim/2 - 1        (rope_inv_freq)
    linear:       inv_freq_j / factor                              (positions squeezed by ``factor``)
    ntk:          base' = base * alpha^(dim / (dim - 2))          (ntk_base)
    dynamic ntk:  base' = base * (alpha * L / T - (alpha - 1))^(dim / (dim - 2))  for L > T, else base
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(base: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies ``1 / base^(2j/dim)`` in float32, as transformers computes them."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents)


def ntk_base(base: float, alpha: float, dim: int) -> float:
    """Static NTK-aware base: ``base * alpha^(dim/(dim-2))``."""
    return base * alpha ** (dim / (dim - 2))


def dynamic_ntk_base(base: float, alpha: float, seq_len: int, train_len: int, dim: int) -> float:
    """Dynamic NTK base for length ``seq_len``: unchanged up to ``train_len``, then
    ``base * (alpha * L / T - (alpha - 1))^(dim/(dim-2))`` (transformers' ``rope_type="dynamic"`` with factor=alpha).
    """
    if seq_len <= train_len:
        return base
    return base * (alpha * seq_len / train_len - (alpha - 1)) ** (dim / (dim - 2))


def scheduled_length(seq_len: int, train_len: int, bucket: int) -> int:
    """The length a bucketed dynamic schedule computes its base from.

    Up to ``train_len`` it is ``train_len`` (the dynamic methods use the stock frequencies there); past it,
    ``seq_len`` rounded up to ``train_len + k * bucket``, so the base changes only every ``bucket`` tokens. That
    is what lets cached generation re-rotate its keys rarely, and a single forward process its queries in few
    groups. ``bucket=1`` is the exact per-token schedule (transformers' own).
    """
    if seq_len <= train_len:
        return train_len
    return train_len + math.ceil((seq_len - train_len) / bucket) * bucket
