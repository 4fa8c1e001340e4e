"""Wiring a method into a loaded transformers model, in place and reversibly.

Three extension points of transformers 5 are used, nothing else is replaced:

* the model's ``rotary_emb``: static methods (linear, ntk, yarn) only rewrite its ``inv_freq`` buffer; dynamic
  methods swap in :class:`DynamicRotary`, which derives the frequencies from the current length;
* ``AttentionInterface`` + ``AttentionMaskInterface``: the model's attention implementation is renamed to
  ``enhance_long_<backend>``, whose function applies the LogN query scale and then calls the stock backend, and
  whose mask function is the stock backend's (without it transformers would silently drop the mask);
* a forward pre-hook on the decoder, run once per forward: it computes the LogN factors of this forward's
  queries and, for ``consistent_ntk``, re-rotates the keys already in the ``DynamicCache`` to the base of the
  current length and splits the queries into groups that share a base.

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
from transformers.cache_utils import Cache, DynamicCache

from enhance_long.attention import (
    ATTENTION_PREFIX,
    _rerotation,
    _slot_positions,
    check_backend,
    register_backend,
)
from enhance_long.methods.catalog import CATALOG, DEFAULT_ROPE, METHODS, Basis, Rope, check_knobs
from enhance_long.methods.logn import logn_scale
from enhance_long.methods.ntk import scheduled_length
from enhance_long.methods.rotation import rotate_in_place
from enhance_long.state import ForwardPlan, PatchState, Settings

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
__all__ = ["DEFAULT_ROPE", "METHODS", "SUPPORTED_MODEL_TYPES", "apply", "describe", "remove", "trained_length"]


def trained_length(config) -> int:
    """The context length the model was trained on: ``original_max_position_embeddings`` if set, else
    ``max_position_embeddings``."""
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    original = rope_parameters.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return int(original or config.max_position_embeddings)


def rotary_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim * partial)


def resolve(model, rope: str = DEFAULT_ROPE, logn: bool = True, train_len: int | None = None, **knobs) -> Settings:
    """Check a request against a model without touching it; every problem is a one-line ``ValueError``."""
    if rope not in CATALOG:
        raise ValueError(f"unknown rope method {rope!r}; choose one of {', '.join(CATALOG)}")
    method = CATALOG[rope]
    logn_len = knobs.pop("logn_len", None)
    values = check_knobs(method, knobs)

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
    backend = _stock_backend(config)
    check_backend(backend)
    if method.far_view is not None and backend == "flash_attention_2":
        raise ValueError(
            f"rope={rope!r} merges two position views before the softmax, which flash-attn cannot express; "
            "use attention=sdpa, eager or flex_attention"
        )
    train_len = train_len or trained_length(config)
    return Settings(method, values, bool(logn), train_len, logn_len or train_len)


def _find_rotary(model) -> nn.Module | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(decoder, "rotary_emb", None)


def _stock_backend(config) -> str:
    name = config._attn_implementation or "sdpa"
    return name.removeprefix(ATTENTION_PREFIX)


class DynamicRotary(nn.Module):
    """Rotary embedding whose frequencies are chosen per forward by the pre-hook (``PatchState.plan.rope``)."""

    def __init__(self, stock: nn.Module, state: PatchState):
        super().__init__()
        self.stock = stock
        self.state = state

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.state.plan.rope
        freqs = position_ids[..., None].float() * rope.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rope.scale).to(x.dtype), (emb.sin() * rope.scale).to(x.dtype)


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
        far_view=method.far_view(settings.knobs) if method.far_view else None,
    )
    if method.dynamic:
        owner.rotary_emb = DynamicRotary(rotary, state)
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


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]


def _make_pre_hook(state: PatchState):
    def before_forward(module, args, kwargs):
        settings = state.settings
        positions = _positions(args, kwargs)
        seq_len = int(positions.max()) + 1
        query_scale = None
        if settings.logn and seq_len > settings.logn_len:
            query_scale = logn_scale(positions, settings.logn_len)[:, None, :, None]
        rope = state.frequencies(seq_len, positions.device)
        groups = []
        if settings.method.consistent:
            if positions.shape[-1] > 1 and seq_len > settings.train_len:
                groups = _query_groups(state, positions)
            if groups:
                # rotate with the largest group's frequencies so the fewest queries and keys need re-rotating
                rope = max(groups, key=lambda group: group[1] - group[0])[2]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None:
                _sync_cache(state, cache, positions, rope)
        state.plan = ForwardPlan(positions, seq_len, query_scale, rope, groups)
        return None

    return before_forward


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


def _query_groups(state: PatchState, positions: torch.Tensor) -> list[tuple[int, int, Rope]]:
    """Runs of consecutive queries that share a base; a single run means no grouping is needed.

    In a left-padded batch every row takes the base of the longest row at each query index, as transformers does.
    """
    settings = state.settings
    longest = positions.max(dim=0).values.tolist()
    lengths = [scheduled_length(p + 1, settings.train_len, settings.knobs["bucket"]) for p in longest]
    groups, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] != lengths[start]:
            groups.append((start, i, state.frequencies(lengths[start], positions.device)))
            start = i
    return groups if len(groups) > 1 else []


def _same(a: Rope, b: Rope) -> bool:
    return a is b or (a.scale == b.scale and torch.equal(a.inv_freq, b.inv_freq))


def _sync_cache(state: PatchState, cache: Cache, positions: torch.Tensor, target: Rope) -> None:
    """Re-rotate every key stored in ``cache`` to ``target``, in place, when it was written with other frequencies.

    Stored keys sit contiguously right before this forward's tokens (also after a sliding window dropped the
    oldest), so the key in slot j of a layer holding n keys has position ``positions[:, 0] - n + j``.
    """
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"rope={state.settings.method.name!r} re-rotates a DynamicCache, got {type(cache).__name__}; "
            "use the default cache (DynamicCache) or rope='dynamic_ntk'"
        )
    written = state.cache_ropes.get(cache) or Rope(state.stock_inv_freq.to(positions.device))
    if not _same(written, target):
        rotations: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            if not torch.is_tensor(keys) or keys.numel() == 0:
                continue
            n = keys.shape[-2]
            if n not in rotations:
                rotations[n] = _rerotation(_slot_positions(positions, n, n), written, target)
            rotate_in_place(keys, *rotations[n])
    state.cache_ropes[cache] = target
