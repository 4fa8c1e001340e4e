"""Attention assembled from pieces of the key range, merged exactly through their log-sum-exps.

Attention over two disjoint key sets K1, K2 follows from each set's own softmax output ``o`` and log-sum-exp ``l``
of the scaled scores (``l = log sum_j exp(scale * q.k_j)``):

    o = o1 * exp(l1 - l) + o2 * exp(l2 - l),        l = logaddexp(l1, l2)

So a method that needs other rotations in other key ranges (a query group of consistent NTK re-rotated to its
base, the position views of Self-Extend, ReRoPE or Dual Chunk Attention) can run each range as one fused kernel
call that is either unmasked or a top-left causal square: the two shapes the kernels run fastest, with no mask built and no score
matrix held. The fused call is PyTorch's own flash kernel on a CPU (the one ``scaled_dot_product_attention`` runs)
and its memory-efficient kernel on a CUDA GPU (which returns the log-sum-exp too); elsewhere :func:`attend` computes
the same pair with matrix products, a bounded block of queries at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from enhance_long.methods.rotation import working_dtype

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_GPU_EFFICIENT = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], tuple[torch.Tensor, torch.Tensor]]


def _cpu_kernel(query, key, value, scale: float, causal: bool):
    return _CPU_FLASH(query, key, value, 0.0, causal, scale=scale)


def _gpu_kernel(query, key, value, scale: float, causal: bool):
    """The memory-efficient kernel (as many key heads as query heads); some versions pad its log-sum-exp to a
    multiple of 32 rows."""
    output, lse, _, _ = _GPU_EFFICIENT(query, key, value, None, True, 0.0, causal, scale=scale)
    return output, lse[..., : query.shape[-2]]


def _kernel(query: torch.Tensor) -> Kernel | None:
    """The fused kernel :func:`attend` runs for queries like ``query``, or None for matrix products."""
    if query.device.type == "cpu" and _CPU_FLASH is not None:
        return _cpu_kernel
    on_gpu = query.device.type == "cuda" and _GPU_EFFICIENT is not None
    return _gpu_kernel if on_gpu and _gpu_kernel_agrees(query.device, query.dtype, query.shape[-1]) else None


def fused(query: torch.Tensor) -> bool:
    """Whether :func:`attend` runs a fused kernel for queries like ``query`` (else it runs matrix products)."""
    return _kernel(query) is not None


@functools.cache
def _gpu_kernel_agrees(device: torch.device, dtype: torch.dtype, dim: int) -> bool:
    """Whether the GPU kernel's output and log-sum-exp equal matrix products' on a small input of this device, dtype
    and head size (40 rows, past one padded block of 32; unmasked and causal). Checked once per kind, so a kernel
    that refuses the shape, or a torch whose log-sum-exp differs, leaves the masked path in place rather than
    merging pieces wrongly."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, dim, generator=g, device=device).to(dtype) for _ in range(3))
    tolerance = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    try:
        for causal in (False, True):
            output, lse = _gpu_kernel(q, k, v, dim**-0.5, causal)
            expected_output, expected_lse = _by_products(q, k, v, dim**-0.5, causal)
            if lse.shape != expected_lse.shape:
                return False
            if not (
                torch.allclose(output.float(), expected_output, **tolerance)
                and torch.allclose(lse.float(), expected_lse, **tolerance)
            ):
                return False
    except (RuntimeError, NotImplementedError, TypeError):  # a shape it refuses, a signature this torch lacks
        return False
    return True


@functools.cache
def _native_gqa() -> bool:
    """Whether the CPU kernel reads key/value head ``h // (heads / kv_heads)`` itself (recent torch does), which
    saves copying the keys per call; probed once on a tiny input against explicitly repeated heads."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 3, 8, generator=g) for n in (2, 1, 1))
    try:
        output, _ = _CPU_FLASH(q, k, v, 0.0, False)
    except RuntimeError:
        return False
    expected, _ = _CPU_FLASH(q, k.expand(1, 2, 3, 8), v.expand(1, 2, 3, 8), 0.0, False)
    return torch.allclose(output, expected)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    causal: bool = False,
    max_block_elements: int = 1 << 25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale * q k^T) v`` and its log-sum-exp per query, in float32 (float64 for float64 inputs).

    ``query`` (batch, heads, n, dim); ``key``/``value`` (batch, kv_heads, m, dim) with kv_heads dividing heads.
    ``causal``: query i sees keys 0..i (top-left, as ``is_causal`` in ``scaled_dot_product_attention``).
    Returns (batch, heads, n, dim) and (batch, heads, n).
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    kernel = _kernel(query)
    if kernel is None:
        return _by_products(query, key, value, scale, causal, max_block_elements)
    if not causal and kv_heads != heads:
        return _folded(kernel, query, key, value, scale)
    if kv_heads != heads and not (kernel is _cpu_kernel and _native_gqa()):
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    output, lse = kernel(query, key, value, scale, causal)
    work = working_dtype(query.dtype)
    return output.to(work), lse.to(work)


def _by_products(query, key, value, scale: float, causal: bool, max_block_elements: int = 1 << 25):
    """:func:`attend` with matrix products, a block of queries at a time (at most ``max_block_elements`` scores)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    n, m = query.shape[-2], key.shape[-2]
    work = working_dtype(query.dtype)
    block = max(1, max_block_elements // max(1, query.shape[0] * heads * m))
    outputs, lses = [], []
    for start in range(0, n, block):
        end = min(start + block, n)
        scores = torch.matmul(query[:, :, start:end], key.transpose(-1, -2)).to(work) * scale
        if causal:
            hidden = torch.arange(m, device=query.device)[None] > torch.arange(start, end, device=query.device)[:, None]
            scores = scores.masked_fill(hidden, float("-inf"))
        lse = scores.logsumexp(dim=-1)
        weights = (scores - lse[..., None]).exp()
        outputs.append(torch.matmul(weights, value.to(work)))
        lses.append(lse)
    return torch.cat(outputs, dim=2), torch.cat(lses, dim=2)


def _folded(kernel: Kernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
    """Unmasked grouped-query attention as one call per key head: the query heads that share a key head are
    stacked as extra query rows (every row sees every key, so rows are independent). The kernel then reads each
    key block once for all of them, and sees enough rows per head for its largest query tiles (on a CPU: 256 rows
    from 768 on; a 256-row query group of 9 heads over 3 key heads runs about 20% faster than with the heads
    apart), and no key is copied per query head."""
    heads, n, kv_heads = query.shape[1], query.shape[2], key.shape[1]
    stacked = query.unflatten(1, (kv_heads, heads // kv_heads)).flatten(2, 3)
    output, lse = kernel(stacked, key, value, scale, False)
    work = working_dtype(query.dtype)
    return output.to(work).unflatten(2, (-1, n)).flatten(1, 2), lse.to(work).unflatten(2, (-1, n)).flatten(1, 2)


class Merged:
    """Attention of a block of query rows over the key pieces added to it, merged once at the end.

    ``into`` (batch, heads, rows, dim), in the pieces' working dtype, receives the result (it may be a view into a larger output, so
    blocks write where they belong without a final concatenation). The first piece must give every row a key (the
    causal square holding each query's own key), so no row's log-sum-exp is -inf; later pieces may cover a
    contiguous subset of the rows. Each piece costs one fused multiply-add over its rows when merged.
    """

    def __init__(self, piece: tuple[torch.Tensor, torch.Tensor], into: torch.Tensor):
        self.into = into
        self.pieces = [(piece, slice(None))]

    def add(self, piece: tuple[torch.Tensor, torch.Tensor], rows: slice = slice(None)) -> None:
        self.pieces.append((piece, rows))

    def merge(self) -> torch.Tensor:
        """Write the merged attention into ``into`` and return it."""
        (_, total), _ = self.pieces[0]
        total = total.clone()
        for (_, lse), rows in self.pieces[1:]:
            total[:, :, rows] = torch.logaddexp(total[:, :, rows], lse)
        for i, ((output, lse), rows) in enumerate(self.pieces):
            weight = (lse - total[:, :, rows]).exp()[..., None]
            if i == 0:  # the first piece covers every row: it writes, the others add
                torch.mul(output, weight, out=self.into)
            else:
                self.into[:, :, rows].addcmul_(output, weight)
        return self.into


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``n`` of ``m`` positions (queries (b, h, n, d), keys (b, h_kv, m, d)): the
    bottom-right causal mask, as two unmasked-or-square pieces: keys ``0..m-n-1`` (all visible) and a causal square.
    Returns (b, h, n, d) in the working dtype (with more than a square, laid out as (b, n, h, d): transformers' layout).
    """
    n, m = query.shape[-2], key.shape[-2]
    square = attend(query, key[:, :, m - n :], value[:, :, m - n :], scale, causal=True)
    if m == n:
        return square[0]
    output = square[0].new_empty(query.shape[0], n, query.shape[1], value.shape[-1])
    merged = Merged(square, into=output.transpose(1, 2))
    merged.add(attend(query, key[:, :, : m - n], value[:, :, : m - n], scale))
    return merged.merge()
