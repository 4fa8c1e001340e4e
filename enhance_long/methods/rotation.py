"""Rotating vectors by RoPE angles: the helpers every method that turns queries or keys shares.

Two layouts of a ``dim``-wide vector are used:

* rotate-half (transformers'): coordinates ``j`` and ``j + dim/2`` form the pair turned by angle ``theta_j``;
* by pairs (:func:`as_pairs`): complex64 ``x_j + i x_(j + dim/2)``, so a rotation is one complex product
  (:func:`turned`) and attention needs no un-pairing (``q . k`` sums over coordinates in any order).

Everything is computed in float32 (float64 for float64 inputs) and rounded once to the caller's dtype.
"""

from __future__ import annotations

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype rotations and attention pieces are computed in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotation_delta(
    positions: torch.Tensor, inv_freq_from: torch.Tensor, inv_freq_to: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle that turns a key rotated with ``inv_freq_from`` into one rotated with ``inv_freq_to``.

    Rotations compose, so ``R(p * to) = R(p * to - p * from) R(p * from)``. Both angles are formed the way the
    model forms them (float32 ``position * inv_freq``) and subtracted in float64, so a chain of re-rotations
    telescopes to the angle a fresh forward would use instead of accumulating float32 rounding.
    Returns float32 tensors of shape ``positions.shape + (dim/2,)``.
    """
    pos = positions.float()[..., None]
    angle = (pos * inv_freq_to.float()).double() - (pos * inv_freq_from.float()).double()
    return angle.cos().float(), angle.sin().float()


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, heads, seq, dim) rotated by per-position angles in the rotate-half layout, as a new tensor.

    ``cos``/``sin`` have shape (batch, seq, dim/2); the first and second halves of the last dimension are the
    two coordinates of each rotated pair, as in transformers' ``rotate_half``. Computed in :func:`working_dtype`.
    """
    half = x.shape[-1] // 2
    work = working_dtype(x.dtype)
    cos = cos[:, None].to(work)
    sin = sin[:, None].to(work)
    if x.dtype == work:
        # three passes, no temporaries: both halves times cos in one product, then each half's sine term added
        # in place (about 25% faster than a product and a fused add per half)
        out = torch.mul(x.unflatten(-1, (2, half)), cos[..., None, :])
        out[..., 0, :].addcmul_(x[..., half:], sin, value=-1)
        out[..., 1, :].addcmul_(x[..., :half], sin)
        return out.flatten(-2)
    x1 = x[..., :half].to(work)
    x2 = x[..., half:].to(work)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def as_pairs(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., dim) in the rotate-half layout as complex64 (complex128 for float64) (..., dim/2): pair j is ``x[j] + i * x[j + dim/2]``.

    A rotation is then one complex product (:func:`turned`), a single pass almost 3x faster than :func:`rotated`'s
    three. Attention needs no un-pairing: ``q . k`` sums over the coordinates in any order, so queries and keys
    both laid out by pairs score exactly as in the rotate-half layout.
    """
    half = x.shape[-1] // 2
    real = x.to(working_dtype(x.dtype))
    return torch.view_as_complex(real.unflatten(-1, (2, half)).transpose(-1, -2).contiguous())


def from_pairs(x: torch.Tensor) -> torch.Tensor:
    """Real vectors laid out by pairs (:func:`turned`'s output) back in the rotate-half layout."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def turned(pairs: torch.Tensor, turn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`as_pairs` vectors (batch, heads, seq, dim/2) rotated by ``turn = cos + i sin`` (batch, seq, dim/2),
    as real (batch, heads, seq, dim) in ``dtype``, laid out by pairs ``[x1_0, x2_0, x1_1, x2_1, ...]``."""
    return torch.view_as_real(pairs * turn[:, None]).flatten(-2).to(dtype)


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """:func:`rotated`, written back into ``x`` (a KV cache's keys keep their storage)."""
    x.copy_(rotated(x, cos, sin))
