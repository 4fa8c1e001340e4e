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

import importlib.util
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama import modeling_llama

from enhance_long.methods.logn import logn_scale
from enhance_long.methods.ntk import (
    as_pairs,
    dynamic_ntk_base,
    ntk_base,
    rope_inv_freq,
    rotate_in_place,
    rotation_delta,
    scheduled_length,
    turned,
)
from enhance_long.methods.pieces import causal_attention, fused
from enhance_long.methods.relative import (
    PositionMap,
    far_view_moves,
    leaky_rerope_positions,
    rerope_positions,
    self_extend_positions,
    two_view_attention,
    two_view_pieces,
)
from enhance_long.methods.yarn import yarn_frequencies

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
ATTENTION_PREFIX = "enhance_long_"


class Rope(NamedTuple):
    """Rotary frequencies and the factor transformers multiplies cos/sin by (YaRN's attention temperature)."""

    inv_freq: torch.Tensor
    scale: float = 1.0


@dataclass(frozen=True)
class Basis:
    """What every frequency function starts from."""

    config: Any
    base: float  # rope_theta
    dim: int  # rotary dimension
    train_len: int


def _stock(b: Basis, k: dict, length: int) -> Rope:
    return Rope(rope_inv_freq(b.base, b.dim))


def _linear(b: Basis, k: dict, length: int) -> Rope:
    return Rope(rope_inv_freq(b.base, b.dim) / k["factor"])


def _ntk(b: Basis, k: dict, length: int) -> Rope:
    return Rope(rope_inv_freq(ntk_base(b.base, k["alpha"], b.dim), b.dim))


def _dynamic_ntk(b: Basis, k: dict, length: int) -> Rope:
    return Rope(rope_inv_freq(dynamic_ntk_base(b.base, k["alpha"], length, b.train_len, b.dim), b.dim))


def _yarn(b: Basis, k: dict, length: int) -> Rope:
    return Rope(*yarn_frequencies(b.config, k["factor"], b.train_len, k["beta_fast"], k["beta_slow"]))


def _ntk_by_parts(b: Basis, k: dict, length: int) -> Rope:
    return Rope(_yarn(b, k, length).inv_freq)


def _dynamic_yarn(b: Basis, k: dict, length: int) -> Rope:
    factor = max(1.0, length / b.train_len)
    return Rope(*yarn_frequencies(b.config, factor, b.train_len, k["beta_fast"], k["beta_slow"]))


@dataclass(frozen=True)
class Method:
    """A RoPE method: its knobs with their defaults, its frequencies, and how they behave."""

    name: str
    knobs: dict[str, Any]
    frequencies: Callable[[Basis, dict, int], Rope] = _stock
    dynamic: bool = False  # the frequencies follow the current length (bucketed past train_len)
    consistent: bool = False  # ... per query, with cached keys re-rotated: cached generation == one forward
    far_view: Callable[[dict], PositionMap] | None = None  # remaps positions beyond knobs["window"]
    reaches: str = ""  # the length it is meant for, in terms of the trained length T and its knobs
    summary: str = ""


_YARN_KNOBS = {"factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0}
SPECS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", {}, reaches="T", summary="the model as it ships (direct extrapolation)"),
        Method("linear", {"factor": 2.0}, _linear, reaches="factor*T", summary="positions divided by factor"),
        Method("ntk", {"alpha": 2.0}, _ntk, reaches="~alpha*T", summary="static NTK-aware base * alpha^(d/(d-2))"),
        Method(
            "dynamic_ntk",
            {"alpha": 2.0, "bucket": 1},
            _dynamic_ntk,
            dynamic=True,
            reaches="any (degrades slowly)",
            summary="NTK base from the current length; cached keys keep the base they were written with",
        ),
        Method(
            "consistent_ntk",
            # bucket 256: a 16k forward past an 8k trained length runs 33 query groups instead of 8193
            {"alpha": 2.0, "bucket": 256},
            _dynamic_ntk,
            dynamic=True,
            consistent=True,
            reaches="any (degrades slowly)",
            summary="dynamic NTK where each query and every key it reads use the base of the query's length",
        ),
        Method("yarn", dict(_YARN_KNOBS), _yarn, reaches="factor*T", summary="YaRN: NTK-by-parts + temperature"),
        Method(
            "ntk_by_parts",
            dict(_YARN_KNOBS),
            _ntk_by_parts,
            reaches="factor*T",
            summary="interpolate low frequencies by factor, keep high ones (YaRN without its temperature)",
        ),
        Method(
            "dynamic_yarn",
            {"beta_fast": 32.0, "beta_slow": 1.0, "bucket": 256},
            _dynamic_yarn,
            dynamic=True,
            consistent=True,
            reaches="any",
            summary="YaRN with factor = length/T per query, consistent like consistent_ntk",
        ),
        Method(
            "self_extend",
            {"group": 4, "window": 1024},
            far_view=lambda k: self_extend_positions(k["group"], k["window"]),
            reaches="(T - window) * group + window",
            summary="Self-Extend: exact positions within window, floor(pos/group) beyond",
        ),
        Method(
            "rerope",
            {"window": 2048},
            far_view=lambda k: rerope_positions(k["window"]),
            reaches="any",
            summary="ReRoPE: relative positions clipped at window",
        ),
        Method(
            "leaky_rerope",
            {"window": 2048, "leak": 16.0},
            far_view=lambda k: leaky_rerope_positions(k["window"], k["leak"]),
            reaches="window + (T - window) * leak",
            summary="leaky ReRoPE: relative positions beyond window grow with slope 1/leak",
        ),
    )
}

# name -> default knobs: what the runner and configs read
METHODS: dict[str, dict[str, Any]] = {name: dict(spec.knobs) for name, spec in SPECS.items()}
DEFAULT_ROPE = "consistent_ntk"


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


@dataclass
class Settings:
    """A validated request: what ``apply`` will install."""

    method: Method
    knobs: dict[str, Any]
    logn: bool
    train_len: int
    logn_len: int


def resolve(model, rope: str = DEFAULT_ROPE, logn: bool = True, train_len: int | None = None, **knobs) -> Settings:
    """Check a request against a model without touching it; every problem is a one-line ``ValueError``."""
    if rope not in SPECS:
        raise ValueError(f"unknown rope method {rope!r}; choose one of {', '.join(SPECS)}")
    method = SPECS[rope]
    logn_len = knobs.pop("logn_len", None)
    unknown = sorted(set(knobs) - set(method.knobs))
    if unknown:
        takes = ", ".join(method.knobs) or "no knobs"
        raise ValueError(f"rope={rope!r} does not take {', '.join(unknown)}; it takes {takes}")
    values = {**method.knobs, **{k: v for k, v in knobs.items() if v is not None}}
    for name in ("alpha", "factor", "beta_fast", "beta_slow", "leak"):
        if name in values and not (isinstance(values[name], int | float) and values[name] > 0):
            raise ValueError(f"{name}={values[name]!r} is invalid for rope={rope!r}; it must be a number > 0")
    for name, meaning in (
        ("bucket", "1 = exact schedule"),
        ("group", "keys merged per position"),
        ("window", "tokens"),
    ):
        if name in values and not (isinstance(values[name], int) and values[name] >= 1):
            raise ValueError(f"{name}={values[name]!r} is invalid; it must be an integer >= 1 ({meaning})")

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


def _find_rotary(model) -> nn.Module | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(decoder, "rotary_emb", None)


def _stock_backend(config) -> str:
    name = config._attn_implementation or "sdpa"
    return name.removeprefix(ATTENTION_PREFIX)


ROTATION_MEMO_BYTES = 1 << 30  # per forward; a 16k forward at the default bucket holds about 0.1 GiB


@dataclass
class ForwardPlan:
    """What the pre-hook derives once per forward and every attention layer reuses."""

    positions: torch.Tensor  # (batch or 1, q_len) position ids of this forward's queries
    seq_len: int  # largest position + 1
    query_scale: torch.Tensor | None  # (batch or 1, 1, q_len, 1) LogN factors, None when all are 1
    rope: Rope  # the frequencies the rotary embedding uses in this forward (those of its largest query group)
    groups: list[tuple[int, int, Rope]]  # (start, end, rope) query runs sharing a base; [] = one base
    memo: dict = field(default_factory=dict)  # per-group rotations and masks, shared across layers

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
    far_view: PositionMap | None = None
    hook: Any = None
    plan: ForwardPlan | None = None
    cache_ropes: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)


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
    elif method.frequencies is not _stock:
        fixed = frequencies(0, rotary.inv_freq.device)
        rotary.inv_freq.copy_(fixed.inv_freq)
        rotary.attention_scaling = fixed.scale
    for module in _attention_modules(model):
        module._enhance_long = state
    _register_backend(backend)
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


def _rerotation(positions: torch.Tensor, source: Rope, target: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin that turn vectors rotated (and scaled) with ``source`` into ones rotated with ``target``."""
    cos, sin = rotation_delta(positions, source.inv_freq, target.inv_freq)
    ratio = target.scale / source.scale
    return (cos * ratio, sin * ratio) if ratio != 1.0 else (cos, sin)


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


def _slot_positions(positions: torch.Tensor, n_before: int, n_slots: int) -> torch.Tensor:
    """Positions of the first ``n_slots`` key slots when ``n_before`` keys precede this forward's tokens."""
    slots = positions[:, :1] - n_before + torch.arange(n_slots, device=positions.device)
    return slots.clamp(min=0)


def _enhanced_attention(backend: str):
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


def _register_backend(backend: str) -> None:
    name = ATTENTION_PREFIX + backend
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _enhanced_attention(backend))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend])
