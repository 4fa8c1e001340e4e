"""The attention function a patched model runs, and its registration for every backend.

``apply`` renames the model's attention implementation to ``enhance_long_<backend>`` and registers it in both of
transformers' registries: ``AttentionInterface`` gets :func:`enhanced_attention` (LogN, the consistent methods'
query groups, the remapping methods' position views, then the stock backend), ``AttentionMaskInterface`` the stock
backend's own mask function (without it transformers would silently drop the mask).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import weakref
from collections.abc import Callable

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama import modeling_llama

import enhance_long.consistent as consistent
from enhance_long.consistent import RotatedKeys, TurnMemo, key_positions, turns
from enhance_long.methods.pieces import causal_attention, fused
from enhance_long.methods.relative import plan_pieces, two_view_attention, two_view_pieces
from enhance_long.methods.rotation import as_pairs, turned, working_dtype
from enhance_long.state import ForwardPlan, PatchState

BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
ATTENTION_PREFIX = "enhance_long_"


def check_backend(backend: str) -> None:
    """Refuse an attention backend this machine cannot run, before transformers falls back to the hub."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
    if backend == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                'attention="flash_attention_2" needs the flash-attn package: pip install "enhance-long[flash]"'
            )
        if not torch.cuda.is_available():
            raise ValueError('attention="flash_attention_2" needs a CUDA GPU; use attention="sdpa" on this machine')


def check_flex_kernel(device: torch.device | str) -> None:
    """Refuse flex attention where torch's compiled kernel gives wrong attention on ``device`` (seen with torch 2.13
    on an AVX2-only CPU: few queries over 40, 56, 72... keys; pytorch/pytorch#159247 is a relative), rather than
    measure a broken kernel. The stock model reads such shapes too, in every cached decoding step."""
    device_type = torch.device(device).type
    error = flex_kernel_error(device_type)
    if error is not None:
        raise ValueError(
            f"attention=flex_attention: torch {torch.__version__}'s compiled flex attention is off by {error:.2g} on "
            f"this {device_type} (a 40-key check against matrix products); use "
            "attention=sdpa or attention=eager, which compute the same attention"
        )


@functools.cache
def flex_kernel_error(device_type: str, kernel: Callable | None = None) -> float | None:
    """The largest difference between transformers' compiled flex attention and matrix products on a small input of
    this device type (GQA, one query over 40 keys and 8 queries over 40, causal to the last key); None where they
    agree to 1e-4. ``kernel`` replaces the compiled flex call (tests)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.integrations.flex_attention import compile_friendly_flex_attention

    kernel = kernel or compile_friendly_flex_attention
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for queries in (1, 8):
        q = torch.randn(2, 4, queries, 16, generator=g).to(device_type)
        k, v = (torch.randn(2, 2, 40, 16, generator=g).to(device_type) for _ in range(2))
        offset = 40 - queries
        mask = create_block_mask(_causal_mod(offset), B=2, H=None, Q_LEN=queries, KV_LEN=40, device=device_type)
        output = kernel(q, k, v, block_mask=mask, scale=0.25, enable_gqa=True)
        output = output[0] if isinstance(output, tuple) else output
        keys, values = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        allowed = _causal(offset, 0, queries, 40, q.device)
        scores = (q @ keys.transpose(-1, -2) * 0.25).masked_fill(~allowed, float("-inf"))
        worst = max(worst, (output - scores.softmax(-1) @ values).abs().max().item())
    return worst if worst > 1e-4 else None


def _causal_mod(offset: int) -> Callable:
    """A flex ``mask_mod``: query i sees keys up to ``offset + i``."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return causal


def enhanced_attention(backend: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state: PatchState = module._enhance_long
        plan = state.plan
        if plan.query_scale is not None:
            query = query * plan.query_scale.to(query.dtype)
        if state.views is not None:
            return _views(state, module, query, key, value, attention_mask, **kwargs)
        stock = _stock_attention(backend, module)
        if not plan.segments:
            return stock(module, query, key, value, attention_mask, **kwargs)
        return _consistent_attention(stock, backend, plan, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"enhance_long_{backend}_attention"
    return attention


def _consistent_attention(stock, backend, plan: ForwardPlan, module, query, key, value, attention_mask, **kwargs):
    """Attention of the consistent methods: queries and keys arrive unrotated; each segment of queries attends to
    its key prefix rotated to each row's frequencies (``consistent.py``), one stock call (or fused pieces) per
    segment. Re-deriving a row's key prefix when its frequencies change is the one cost these methods add to a
    forward, O(n^2 / bucket) per layer."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    n_before = kv_len - q_len
    key_pos = plan.remembered(("key positions", n_before), lambda: key_positions(plan.positions, n_before))
    copy = RotatedKeys() if plan.copies is None else plan.copies.setdefault(module.layer_idx, RotatedKeys())
    copy.valid = min(copy.valid, n_before)
    query_turn = plan.remembered("query turn", lambda: turns(plan.positions, plan.lengths, plan.ropes))
    query = turned(as_pairs(query), query_turn, query.dtype)
    single = len(plan.segments) == 1  # decoding, inside T, per_forward: one stock call with the stock mask
    pieces = not single and _pieces_apply(backend, plan, module, query, key, attention_mask, kwargs)
    memo, slack = _turn_memo(plan), plan.copies is not None
    outputs = []
    for segment in plan.segments:
        start, end = segment.start, segment.end
        kv_end = n_before + end
        k = copy.at(key, key_pos, segment.lengths, kv_end, plan.ropes, memo, slack)
        q, v = query[:, :, start:end], value[:, :, :kv_end]
        if pieces:
            output = causal_attention(q, k, v, _scaling(module, kwargs.get("scaling"))).transpose(1, 2)
            outputs.append(output.to(value.dtype))
            continue
        mask = attention_mask if single else _group_mask(backend, plan, attention_mask, start, end, n_before, kv_end, q)
        output, _ = stock(module, q, k, v, mask, **kwargs)
        outputs.append(output)
    if plan.copies is not None:  # tie the copy to the key tensor it now mirrors (the cache layer's), for next time
        copy.source = weakref.ref(key)
    return (outputs[0] if single else torch.cat(outputs, dim=1).contiguous()), None


def _turn_memo(plan: ForwardPlan) -> TurnMemo:
    return plan.remembered("turns", lambda: TurnMemo(consistent.ROTATION_MEMO_BYTES))


def _pieces_apply(backend: str, plan: ForwardPlan, module, query, key, attention_mask, kwargs) -> bool:
    """Whether this sdpa call may be assembled from fused pieces (``methods/pieces.py``) instead of masked calls:
    a fused kernel on this device, causal attention without padding, contiguous positions, nothing else asked of
    the kernel (dropout, a sliding window, soft-capping)."""
    if backend != "sdpa" or attention_mask is not None or not fused(query):
        return False
    if (module.training and kwargs.get("dropout", 0.0)) or kwargs.get("sliding_window") or kwargs.get("softcap"):
        return False
    q_len, kv_len = query.shape[-2], key.shape[-2]

    def contiguous() -> bool:
        expected = torch.arange(kv_len - q_len, kv_len, device=plan.positions.device)
        return bool((plan.positions == expected).all())

    return plan.remembered(("contiguous", q_len, kv_len), contiguous)


def _scaling(module, scaling: float | None) -> float:
    """The softmax scale a backend was given, else the layer's own (as transformers' backends do)."""
    return module.scaling if scaling is None else scaling


def _causal(n_before: int, start: int, end: int, kv_end: int, device) -> torch.Tensor:
    """(end - start, kv_end) bool: query i of this forward may see key slots up to n_before + i."""
    return torch.arange(kv_end, device=device)[None, :] <= n_before + torch.arange(start, end, device=device)[:, None]


def _group_mask(backend, plan: ForwardPlan, attention_mask, start, end, n_before, kv_end, query):
    """The slice of this forward's mask for queries [start, end) and keys [0, kv_end), in the backend's form."""
    if backend == "flash_attention_2":
        # flash takes a 2D padding mask (or none) and aligns its causal mask bottom-right, as each group needs
        return None if attention_mask is None else attention_mask[:, :kv_end]
    if attention_mask is not None and not torch.is_tensor(attention_mask):
        return _flex_group_mask(plan, attention_mask, start, end, kv_end, query)
    if attention_mask is not None:
        return attention_mask[:, :, start:end, :kv_end]
    if n_before + start == 0:
        return None  # a group starting at key 0 is plain causal: the backend's own fast path applies
    # otherwise a group's causal mask is bottom-right aligned, which "no mask" does not mean: build it
    allowed = _causal(n_before, start, end, kv_end, query.device)
    if backend == "eager":
        return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min
        )[None, None]
    return allowed[None, None]


def _flex_group_mask(plan: ForwardPlan, block_mask, start, end, kv_end, query):
    from torch.nn.attention.flex_attention import create_block_mask

    full = block_mask.mask_mod

    def shifted(b, h, q_idx, kv_idx):
        return full(b, h, q_idx + start, kv_idx)

    def make():
        return create_block_mask(
            shifted, B=block_mask.shape[0], H=None, Q_LEN=end - start, KV_LEN=kv_end, device=query.device
        )

    return plan.remembered(("flex", start, kv_end), make)


def _views(state: PatchState, module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The remapping methods' attention: each (query, key) pair scored in its view, one softmax
    (``methods/relative.py``); plain attention while no pair is past the views' exact range."""
    plan = state.plan
    views = state.views
    if plan.seq_len <= views.exact_below:
        return _stock_attention(state.backend, module)(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    scaling = _scaling(module, scaling)
    inv_freq = plan.rope.inv_freq
    if _pieces_apply(state.backend, plan, module, query, key, attention_mask, kwargs):
        n, kv = query.shape[-2], key.shape[-2]
        work = working_dtype(query.dtype)
        pieces = plan.remembered(("views", n, kv), lambda: plan_pieces(n, kv, views, inv_freq, work))
        return two_view_pieces(query, key, value, views, inv_freq=inv_freq, scaling=scaling, plan=pieces), None
    q_len, kv_len = query.shape[-2], key.shape[-2]
    n_before = kv_len - q_len
    k_pos = key_positions(plan.positions, n_before)

    def allowed(start: int, end: int) -> torch.Tensor:
        if attention_mask is None:
            return _causal(n_before, start, end, kv_len, query.device)[None, None]
        if torch.is_tensor(attention_mask):
            rows = attention_mask[:, :, start:end, :kv_len]
            return rows if rows.dtype == torch.bool else rows == 0
        index = torch.arange(kv_len, device=query.device)
        batch = torch.arange(attention_mask.shape[0], device=query.device)[:, None, None, None]
        q_idx = torch.arange(start, end, device=query.device)[None, None, :, None]
        return attention_mask.mask_mod(batch, torch.zeros_like(batch), q_idx, index[None, None, None, :])

    output = two_view_attention(
        query, key, value, plan.positions, k_pos, views, inv_freq=inv_freq, scaling=scaling, allowed=allowed
    )
    return output, None


def _stock_attention(backend: str, module) -> Callable:
    if backend == "eager":
        modeling = sys.modules.get(type(module).__module__)
        return getattr(modeling, "eager_attention_forward", modeling_llama.eager_attention_forward)
    if backend == "flash_attention_2":
        return _flash_attention
    return ALL_ATTENTION_FUNCTIONS[backend]


def _flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' flash path, named explicitly: its own wrapper would look the kernel up under our name."""
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    output = _flash_attention_forward(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask,
        query_length=query.shape[2],
        is_causal=kwargs.pop("is_causal", module.is_causal),
        dropout=dropout,
        softmax_scale=scaling,
        target_dtype=get_target_dtype(query, module),
        attn_implementation="flash_attention_2",
        layer_idx=getattr(module, "layer_idx", None),
        **kwargs,
    )
    return output, None


def register_backend(backend: str) -> None:
    name = ATTENTION_PREFIX + backend
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, enhanced_attention(backend))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend])
