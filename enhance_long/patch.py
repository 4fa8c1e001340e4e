"""Wiring a method into a loaded transformers model, in place and reversibly.

Three extension points of transformers 5 are used, nothing else is replaced:

* the model's ``rotary_emb``: static methods (linear, ntk, yarn) only rewrite its ``inv_freq`` buffer; dynamic
  methods swap in :class:`DynamicRotary`, which derives the frequencies from the current length, and views whose
  rotary rotates at other positions (Dual Chunk Attention: ``p mod s``) swap in :class:`RemappedRotary`;
* ``AttentionInterface`` + ``AttentionMaskInterface``: the model's attention implementation is renamed to
  ``enhance_long_<backend>``, whose function applies the LogN query scale and then calls the stock backend, and
  whose mask function is the stock backend's (without it transformers would silently drop the mask);
* a forward pre-hook on the decoder, run once per forward: it computes the LogN factors of this forward's
  queries (LogN times the method's own temperature) and, for the consistent methods, each query's base and the
  groups of queries that share one, and finds the rotated copy of the cached keys kept beside the ``DynamicCache``
  (the attention derives it again when the base moves: ``consistent.py``).

Consistent dynamic NTK gives the query at position i, and every key it attends to, the base of length i + 1
(bucketed: see ``scheduled_length``). The output at position i then depends only on tokens 0..i, as in any
causal model, so token-by-token generation with the cache equals one full forward over the same prefix.
Transformers' dynamic NTK instead rotates a whole forward with the base of its longest position and leaves
cached keys with the base they were written with, so its outputs depend on how the text was chunked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from enhance_long.attention import ATTENTION_PREFIX, check_backend, check_flex_kernel, register_backend
from enhance_long.consistent import identity_rotation, query_lengths, segments, validate_copies
from enhance_long.methods.catalog import CATALOG, DEFAULT_ROPE, METHODS, Basis, Rope, check_knobs
from enhance_long.methods.logn import logn_scale
from enhance_long.methods.ntk import scheduled_length
from enhance_long.methods.rotation import from_pairs
from enhance_long.state import ForwardPlan, PatchState, Settings

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
NUMBERS = {2: "two", 3: "three"}
__all__ = ["DEFAULT_ROPE", "METHODS", "SUPPORTED_MODEL_TYPES", "apply", "describe", "remove", "trained_length"]


def trained_length(config) -> int:
    """The context length the model was trained on: ``original_max_position_embeddings`` if set, else
    ``max_position_embeddings``."""
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    original = rope_parameters.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return int(original or config.max_position_embeddings)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    head_dim = _head_dim(config)
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim * partial)


def resolve(model, rope: str = DEFAULT_ROPE, logn: bool = True, train_len: int | None = None, **knobs) -> Settings:
    """Check a request against a model without touching it; every problem is a one-line ``ValueError``."""
    if rope not in CATALOG:
        raise ValueError(f"unknown rope method {rope!r}; choose one of {', '.join(CATALOG)}")
    method = CATALOG[rope]
    logn_len = knobs.pop("logn_len", None)

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; enhance_long supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rotary = _find_rotary(model)
    if rotary is None:
        raise ValueError(f"model {type(model).__name__} has no rotary embedding (rotary_emb); nothing to extend")
    stock_rope = (config.rope_parameters or {}).get("rope_type", "default")
    if method.name != "none" and stock_rope != "default":
        raise ValueError(
            f"model already uses rope_type={stock_rope!r}; rope={rope!r} starts from plain RoPE, use rope='none'"
        )
    for name, value in (("train_len", train_len), ("logn_len", logn_len)):
        if value is not None and not (isinstance(value, int) and value > 1):
            raise ValueError(f"{name}={value!r} is invalid; it must be an integer > 1 (or None for the model's own)")
    train_len = train_len or trained_length(config)
    values = check_knobs(method, knobs, train_len)
    backend = _stock_backend(config)
    check_backend(backend)
    if backend == "flex_attention":
        check_flex_kernel(next(model.parameters()).device)
    if method.views is not None and backend == "flash_attention_2":
        count = len(method.views(values).views)
        raise ValueError(
            f"rope={rope!r} merges {NUMBERS.get(count, count)} position views before the softmax, which flash-attn "
            "cannot express; use attention=sdpa, eager or flex_attention"
        )
    if method.consistent and rotary_dim(config) != _head_dim(config):
        raise ValueError(
            f"rope={rope!r} rotates whole heads, but this model rotates {rotary_dim(config)} of {_head_dim(config)} "
            "dimensions (partial_rotary_factor); use rope='dynamic_ntk' or a static method"
        )
    return Settings(method, values, bool(logn), train_len, logn_len or train_len)


def _find_rotary(model) -> nn.Module | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(decoder, "rotary_emb", None)


def _stock_backend(config) -> str:
    name = config._attn_implementation or "sdpa"
    return name.removeprefix(ATTENTION_PREFIX)


class DynamicRotary(nn.Module):
    """The rotary embedding of a dynamic method: transformers' dynamic NTK rotates with the frequencies the pre-hook
    chose for this forward (``plan.rope``); the consistent methods get the identity, and their attention rotates
    queries and keys itself (``consistent.py``), so the cache stores keys before RoPE."""

    def __init__(self, state: PatchState):
        super().__init__()
        self.state = state

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.state.plan.rope
        if rope is None:
            return identity_rotation(x, position_ids)
        freqs = position_ids[..., None].float() * rope.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rope.scale).to(x.dtype), (emb.sin() * rope.scale).to(x.dtype)


class RemappedRotary(nn.Module):
    """The stock rotary embedding at remapped positions (Dual Chunk Attention rotates at ``p mod s``): queries and
    keys, so the cache stores keys at those positions, which never change."""

    def __init__(self, stock: nn.Module, positions: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.stock = stock
        self.positions = positions

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stock(x, self.positions(position_ids))


def _frequency_schedule(model, settings: Settings) -> Callable[[int, torch.device], Rope]:
    """The method's frequencies as a function of (sequence length, device), memoized per scheduled length."""
    config = model.config
    basis = Basis(config, float(config.rope_parameters["rope_theta"]), rotary_dim(config), settings.train_len)
    method, knobs = settings.method, settings.knobs
    memo: dict[tuple[int, torch.device], Rope] = {}

    def frequencies(seq_len: int, device: torch.device) -> Rope:
        length = scheduled_length(seq_len, settings.train_len, knobs["bucket"]) if method.dynamic else 0
        key = (length, torch.device(device))
        if key not in memo:
            rope = method.frequencies(basis, knobs, length)
            memo[key] = Rope(rope.inv_freq.to(device), float(rope.scale))
        return memo[key]

    return frequencies


def apply(model, rope: str = DEFAULT_ROPE, logn: bool = True, train_len: int | None = None, **knobs):
    """Patch ``model`` in place with a RoPE method and optional LogN scaling; returns the model.

    ``rope`` is one of ``METHODS``; ``knobs`` are that method's settings (see ``METHODS[rope]`` for the names
    and defaults) plus ``logn_len`` (LogN's T, default ``train_len``). ``train_len`` defaults to the model's
    trained length. A model that is already patched is restored first. Nothing changes on error.
    """
    settings = resolve(model, rope, logn, train_len, **knobs)
    remove(model)
    config = model.config
    backend = _stock_backend(config)
    rotary = _find_rotary(model)
    owner = model.get_decoder() if hasattr(model, "get_decoder") else model
    frequencies = _frequency_schedule(model, settings)
    method = settings.method
    state = PatchState(
        settings=settings,
        backend=backend,
        stock_attn=config._attn_implementation,
        rotary_owner=owner,
        stock_rotary=rotary,
        stock_inv_freq=rotary.inv_freq.detach().clone(),
        stock_attention_scaling=rotary.attention_scaling,
        frequencies=frequencies,
        views=method.views(settings.knobs) if method.views else None,
    )
    if method.dynamic:
        owner.rotary_emb = DynamicRotary(state)
    elif state.views is not None and state.views.rotary is not None:
        owner.rotary_emb = RemappedRotary(rotary, state.views.rotary)
    elif method.frequencies is not CATALOG["none"].frequencies:
        fixed = frequencies(0, rotary.inv_freq.device)
        rotary.inv_freq.copy_(fixed.inv_freq)
        rotary.attention_scaling = fixed.scale
    for module in _attention_modules(model):
        module._enhance_long = state
    register_backend(backend)
    config._attn_implementation = ATTENTION_PREFIX + backend
    state.hook = owner.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True)
    model._enhance_long = state
    return model


def remove(model):
    """Undo ``apply``: the model computes exactly what it computed before; returns the model."""
    state: PatchState | None = getattr(model, "_enhance_long", None)
    if state is None:
        return model
    state.hook.remove()
    state.rotary_owner.rotary_emb = state.stock_rotary
    state.stock_rotary.inv_freq.copy_(state.stock_inv_freq)
    state.stock_rotary.attention_scaling = state.stock_attention_scaling
    for module in _attention_modules(model):
        del module._enhance_long
    model.config._attn_implementation = state.stock_attn
    del model._enhance_long
    return model


def describe(model) -> dict[str, Any] | None:
    """What is installed on ``model`` (None when unpatched): method, knobs, LogN, lengths, backend."""
    state: PatchState | None = getattr(model, "_enhance_long", None)
    if state is None:
        return None
    s = state.settings
    return {
        "rope": s.method.name,
        **s.knobs,
        "logn": s.logn,
        "train_len": s.train_len,
        "logn_len": s.logn_len,
        "attention": state.backend,
    }


_STATIC_ROPE_TYPES = {"default", "linear", "yarn", "llama3"}  # unpatched rope types that ignore the forward's length


def _stock_rope_static(model) -> bool | None:
    """For an unpatched model: whether its own ``rope_type`` ignores the forward's length (None: no rope config)."""
    rope = getattr(getattr(model, "config", None), "rope_parameters", None)
    return None if rope is None else rope.get("rope_type", "default") in _STATIC_ROPE_TYPES


def prefix_exact(model) -> bool:
    """Whether ``model`` computes a forward's first n positions exactly as a forward of just those n tokens (so a
    prefix's KV cache, or its losses, can be reused): causal attention and frequencies that do not follow the length
    of the whole forward (not dynamic NTK, nor the per_forward schedule)."""
    info = describe(model)
    if info is None:
        return _stock_rope_static(model) is True
    return CATALOG[info["rope"]].prefix_exact(info)


def cache_dependent(model) -> bool:
    """Whether the frequencies follow the length, so that feeding a text through the KV cache in chunks scores it
    differently from one forward unless the method keeps the cache consistent: transformers' dynamic NTK (it does
    not), the consistent methods and dynamic YaRN (they do; measuring both shows it). Every other method keeps each
    key's rotation fixed once written, so the two agree to rounding (tests/test_patch.py)."""
    info = describe(model)
    if info is None:
        return _stock_rope_static(model) is False
    return CATALOG[info["rope"]].dynamic


def attended_keys(model, cache, layer: int) -> torch.Tensor:
    """The keys layer ``layer`` attended to in the last forward through ``cache``, rotated as the attention read them:
    (batch, kv_heads, n, head_dim) in transformers' rotate-half layout. For the consistent methods that is the
    rotated copy kept beside the cache (whose own keys are unrotated), else the cache's keys themselves."""
    state: PatchState | None = getattr(model, "_enhance_long", None)
    copies = state.rotated_keys.get(cache) if state is not None else None
    if copies is None:
        return cache.layers[layer].keys
    copy = copies[layer]
    return from_pairs(copy.buffer[:, :, : copy.valid])


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]


def _make_pre_hook(state: PatchState):
    def before_forward(module, args, kwargs):
        settings = state.settings
        positions = _positions(args, kwargs)
        seq_len = int(positions.max()) + 1
        query_scale = _query_scale(settings, positions, seq_len)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        method = settings.method
        if cache is not None and (method.consistent or method.views) and not isinstance(cache, DynamicCache):
            doing = "re-rotates" if method.consistent else "reads key positions from"
            raise ValueError(
                f"rope={method.name!r} {doing} a DynamicCache, got {type(cache).__name__}; "
                "use the default cache (DynamicCache) or a method without state, e.g. rope='dynamic_ntk'"
            )
        if not method.consistent:
            state.plan = ForwardPlan(positions, seq_len, query_scale, state.frequencies(seq_len, positions.device))
            return None
        knobs = settings.knobs
        lengths = query_lengths(
            positions, settings.train_len, knobs["bucket"], knobs["schedule"], _real_queries(kwargs, positions)
        )
        ropes = {length: state.frequencies(length, positions.device) for length in lengths.unique().tolist()}
        copies = None
        if cache is not None:
            copies = state.rotated_keys.setdefault(cache, {})
            validate_copies(copies, cache)
        state.plan = ForwardPlan(
            positions, seq_len, query_scale, None, segments(lengths), lengths=lengths, ropes=ropes, copies=copies
        )
        return None

    return before_forward


def _query_scale(settings: Settings, positions: torch.Tensor, seq_len: int) -> torch.Tensor | None:
    """(rows, 1, q, 1) logit factors of this forward's queries: LogN times the method's own temperature, or None
    when every factor is 1."""
    scale = None
    if settings.logn and seq_len > settings.logn_len:
        scale = logn_scale(positions, settings.logn_len)
    if settings.method.attention_scale is not None:
        temperature = settings.method.attention_scale(settings.knobs, positions, settings.train_len)
        if temperature is not None:
            scale = temperature if scale is None else scale * temperature
    return None if scale is None else scale[:, None, :, None]


def _real_queries(kwargs, positions: torch.Tensor) -> torch.Tensor | None:
    """Which of this forward's queries are real tokens (rows, q), from a 2D padding mask; None without one."""
    mask = kwargs.get("attention_mask")
    if not torch.is_tensor(mask) or mask.dim() != 2:
        return None
    return mask[:, -positions.shape[-1] :].bool()


def _positions(args, kwargs) -> torch.Tensor:
    """This forward's position ids, derived as the decoder itself derives them when none are given."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        return positions if positions.dim() == 2 else positions[None]
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs["inputs_embeds"]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(inputs.shape[1], device=inputs.device) + past)[None]
