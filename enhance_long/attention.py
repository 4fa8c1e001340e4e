"""The attention function a patched model runs, and its registration for every backend.

``apply`` renames the model's attention implementation to ``enhance_long_<backend>`` and registers it in both of
transformers' registries: ``AttentionInterface`` gets :func:`enhanced_attention` (LogN, the consistent methods'
query groups, the remapping methods' two views, then the stock backend), ``AttentionMaskInterface`` the stock
backend's own mask function (without it transformers would silently drop the mask).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama import modeling_llama

from enhance_long.methods.catalog import Rope
from enhance_long.methods.pieces import causal_attention, fused
from enhance_long.methods.relative import far_view_moves, two_view_attention, two_view_pieces
from enhance_long.methods.rotation import as_pairs, rotation_delta, turned
from enhance_long.state import ForwardPlan, PatchState

BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
ATTENTION_PREFIX = "enhance_long_"
ROTATION_MEMO_BYTES = 1 << 30  # per forward; a 16k forward at the default bucket holds about 0.1 GiB


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


def _rerotation(positions: torch.Tensor, source: Rope, target: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin that turn vectors rotated (and scaled) with ``source`` into ones rotated with ``target``."""
    cos, sin = rotation_delta(positions, source.inv_freq, target.inv_freq)
    ratio = target.scale / source.scale
    return (cos * ratio, sin * ratio) if ratio != 1.0 else (cos, sin)


def _slot_positions(positions: torch.Tensor, n_before: int, n_slots: int) -> torch.Tensor:
    """Positions of the first ``n_slots`` key slots when ``n_before`` keys precede this forward's tokens."""
    slots = positions[:, :1] - n_before + torch.arange(n_slots, device=positions.device)
    return slots.clamp(min=0)


def enhanced_attention(backend: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state: PatchState = module._enhance_long
        plan = state.plan
        if plan.query_scale is not None:
            query = query * plan.query_scale.to(query.dtype)
        if state.far_view is not None:
            return _two_view(state, module, query, key, value, attention_mask, **kwargs)
        stock = _stock_attention(backend, module)
        if not plan.groups:
            return stock(module, query, key, value, attention_mask, **kwargs)
        return _grouped_attention(stock, backend, plan, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"enhance_long_{backend}_attention"
    return attention


def _grouped_attention(stock, backend, plan: ForwardPlan, module, query, key, value, attention_mask, **kwargs):
    """One stock attention call per group of queries, each with its queries and keys re-rotated to its base.

    The rotary embedding rotated this forward with ``plan.rope`` (the largest group's); other groups see a
    re-rotated copy of the query rows they own and of the key prefix they may attend to. Those copies are laid out
    by pairs (:func:`as_pairs`, paired once per layer), where a re-rotation is one complex product: re-rotating
    each group's key prefix is the one cost this method adds to a forward, O(n^2 / bucket) per layer.
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    n_before = kv_len - q_len
    pieces = _pieces_apply(backend, plan, module, query, key, attention_mask, kwargs)
    paired_query, paired_key = as_pairs(query), as_pairs(key)
    outputs = []
    for start, end, rope in plan.groups:
        kv_end = n_before + end
        q, k, v = query[:, :, start:end], key[:, :, :kv_end], value[:, :, :kv_end]
        if rope is not plan.rope:
            turn = _group_rotation(plan, start, kv_len, n_before, kv_end, rope)
            q = turned(paired_query[:, :, start:end], turn[:, n_before + start :], query.dtype)
            k = turned(paired_key[:, :, :kv_end], turn, key.dtype)
        if pieces:
            outputs.append(
                causal_attention(q, k, v, _scaling(module, kwargs.get("scaling"))).transpose(1, 2).to(value.dtype)
            )
            continue
        mask = _group_mask(backend, plan, attention_mask, start, end, n_before, kv_end, query)
        output, _ = stock(module, q, k, v, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1).contiguous(), None


def _group_rotation(plan: ForwardPlan, start: int, kv_len: int, n_before: int, kv_end: int, rope: Rope):
    """``cos + i sin`` (batch, kv_end, dim/2) re-rotating a group's key prefix to its base (:func:`turned`): formed
    by the first layer and kept for the others while the forward's rotations fit in ``ROTATION_MEMO_BYTES``, formed
    anew per layer beyond that (bucket=1 over a long input has thousands of groups, whose rotations together would
    take tens of GiB)."""
    memo_key = ("rotation", start, kv_len)
    if memo_key in plan.memo:
        return plan.memo[memo_key]
    rotation = torch.complex(*_rerotation(_slot_positions(plan.positions, n_before, kv_end), plan.rope, rope))
    size = rotation.numel() * rotation.element_size()
    held = plan.memo.get("rotation_bytes", 0)
    if held + size <= ROTATION_MEMO_BYTES:
        plan.memo[memo_key] = rotation
        plan.memo["rotation_bytes"] = held + size
    return rotation


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


def _two_view(state: PatchState, module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Self-Extend / ReRoPE attention: exact scores within the window, the far view beyond, one softmax."""
    plan = state.plan
    window = state.settings.knobs["window"]
    if plan.seq_len <= window:  # no key is farther than the window: the far view is never read
        return _stock_attention(state.backend, module)(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    scaling = _scaling(module, scaling)
    if _pieces_apply(state.backend, plan, module, query, key, attention_mask, kwargs):
        n, kv = query.shape[-2], key.shape[-2]
        moves = plan.remembered(("far view", n, kv), lambda: far_view_moves(n, kv, state.far_view, plan.rope.inv_freq))
        return two_view_pieces(
            query, key, value, state.far_view, window, plan.rope.inv_freq, scaling, moves=moves
        ), None
    q_len, kv_len = query.shape[-2], key.shape[-2]
    n_before = kv_len - q_len
    k_pos = _slot_positions(plan.positions, n_before, kv_len)

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
        query,
        key,
        value,
        plan.positions,
        k_pos,
        state.far_view,
        window,
        plan.rope.inv_freq,
        scaling,
        allowed,
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
