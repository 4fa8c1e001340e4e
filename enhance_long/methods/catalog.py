"""The method catalogue: every RoPE method by name, with its knobs, its frequencies and what it is meant to do.

This is the one place a method is described. ``enhance_long.apply`` checks a request against it, the runner fills
in defaults from it, the config schema lists its knobs, and the README's methods table is rendered from it
(:func:`methods_table`; a test keeps the two equal). A method from outside the package joins with
:func:`register_method`::

    from enhance_long.methods.catalog import Knob, Method, Rope, register_method, rope_inv_freq

    def halved(basis, knobs, length):              # frequencies for a forward whose longest position is length - 1
        return Rope(rope_inv_freq(basis.base, basis.dim) / knobs["divisor"])

    register_method(Method("halved", (Knob("divisor", 2.0, "positions divided by it", minimum=1.0),), halved))

A knob whose default follows the trained length T has ``default=None`` and a :class:`FromTrained` rule
(``Knob("window", None, ..., derived=FromTrained("T", lambda t, knobs: t))``); :func:`check_knobs` resolves it when
the method is applied. Methods that score pairs at remapped positions give ``views`` (``methods/relative.py``);
a per-query temperature is ``attention_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from enhance_long.methods.ntk import dynamic_ntk_base, ntk_base, rope_inv_freq
from enhance_long.methods.relative import (
    Views,
    beyond_window,
    dual_chunk_views,
    lambda_views,
    leaky_rerope_positions,
    rerope_positions,
    self_extend_positions,
    sink_views,
    string_views,
)
from enhance_long.methods.temperature import chunk_attention_scale, constant_attention_scale
from enhance_long.methods.yarn import yarn_frequencies


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


@dataclass(frozen=True)
class FromTrained:
    """A default that follows the trained length: ``of(T, knobs)``, given the method's knobs resolved before this one;
    ``text`` is how the methods table shows it ("3T/4")."""

    text: str
    of: Callable[[int, dict], Any]


@dataclass(frozen=True)
class Knob:
    """One setting of a method: its default, what it means, and the values it allows."""

    name: str
    default: Any  # None with ``derived``: the value follows the trained length (resolved by check_knobs)
    help: str  # what it means, in a few words (config comments, errors)
    integer: bool = False  # an int (else any real number)
    minimum: float = 0.0  # the smallest allowed value ...
    inclusive: bool = True  # ... allowed itself (False: values must lie above it)
    choices: tuple[str, ...] = ()  # a word from this list instead of a number
    derived: FromTrained | None = None  # the default when ``default`` is None

    @property
    def requirement(self) -> str:
        """What a valid value is, as the end of an error sentence: "a number > 0", "an integer >= 1 (...)"."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        bound = f"{'>=' if self.inclusive else '>'} {self.minimum:g}"
        return f"an integer {bound} ({self.help})" if self.integer else f"a number {bound}"

    def valid(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int if self.integer else int | float):
            return False
        return value >= self.minimum if self.inclusive else value > self.minimum


Frequencies = Callable[[Basis, dict, int], Rope]


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
    """A RoPE method: its knobs, its frequencies, how they behave, and what it is for (the README row)."""

    name: str
    knobs: tuple[Knob, ...] = ()
    frequencies: Frequencies = _stock
    dynamic: bool = False  # the frequencies follow the current length (bucketed past train_len)
    consistent: bool = False  # ... per query, with cached keys re-rotated: cached generation == one forward
    views: Callable[[dict], Views] | None = None  # scores each (query, key) pair in one of several position views
    attention_scale: Callable[[dict, torch.Tensor, int], torch.Tensor | None] | None = None  # (knobs, positions, T)
    # -> each query's logit factor (its attention temperature), None where all are 1
    does: str = ""  # what it does, in a phrase
    formula: str = ""
    reach: str = ""  # the length it is meant for, in terms of T and its knobs
    checks: tuple[Callable[[dict], str | None], ...] = field(default=())  # cross-knob checks: a problem or None

    @property
    def defaults(self) -> dict[str, Any]:
        return {knob.name: knob.default for knob in self.knobs}

    def knob(self, name: str) -> Knob:
        return next(knob for knob in self.knobs if knob.name == name)

    def prefix_exact(self, knobs: dict) -> bool:
        """Whether a forward's outputs at its first n positions equal those of a forward of just those n tokens:
        true unless the frequencies follow the whole forward's length (dynamic NTK, the per_forward schedule)."""
        if self.consistent:
            return knobs.get("schedule", "per_query") == "per_query"
        return not self.dynamic


ALPHA = Knob("alpha", 2.0, "NTK scale: the base grows as alpha^(d/(d-2))", minimum=0.0, inclusive=False)
FACTOR = Knob("factor", 2.0, "context stretch factor", minimum=1.0)
BETA_FAST = Knob(
    "beta_fast", 32.0, "YaRN: rotations per context above which a dimension is not interpolated", inclusive=False
)
BETA_SLOW = Knob(
    "beta_slow", 1.0, "YaRN: rotations per context below which a dimension is fully interpolated", inclusive=False
)
WINDOW_HELP = "exact-position window in tokens"


SCHEDULE = Knob(
    "schedule",
    "per_query",
    "per_query: each query's own length; per_forward: the longest of the forward (the original enhance-long)",
    choices=("per_query", "per_forward"),
)


def _bucket(default: int) -> Knob:
    return Knob(
        "bucket", default, "the base is recomputed every bucket tokens past T; 1 = exact", integer=True, minimum=1
    )


def _window(default: int | None, derived: FromTrained | None = None) -> Knob:
    return Knob("window", default, WINDOW_HELP, integer=True, minimum=1, derived=derived)


def _below(small: str, large: str, why: str) -> Callable[[dict], str | None]:
    """A check that knob ``small`` lies below knob ``large``."""

    def check(knobs: dict) -> str | None:
        if knobs[small] >= knobs[large]:
            return f"{small}={knobs[small]!r} must be below {large}={knobs[large]!r} ({why})"
        return None

    return check


DUAL_CHUNK_KNOBS = (
    Knob(
        "chunk_size",
        None,
        "DCA: the largest relative position; chunks are chunk_size - local_window tokens",
        integer=True,
        minimum=2,
        derived=FromTrained("3T/4", lambda t, k: t * 3 // 4),
    ),
    Knob(
        "local_window",
        None,
        "DCA: the first local_window queries of a chunk read the previous chunk at exact distances",
        integer=True,
        minimum=1,
        derived=FromTrained("T/8", lambda t, k: max(1, t // 8)),
    ),
    Knob("mscale", 0.05, "DCA: logits x (1 + mscale ln(L/T))^2 past T; 0.1 as its flash variant and vLLM, 0 off"),
)
STRING_KNOBS = (
    Knob(
        "shifted_offset",
        None,
        "STRING: distances from shifted_offset on are shifted back to start at local_value",
        integer=True,
        minimum=1,
        derived=FromTrained("int(0.33T)", lambda t, k: max(1, int(0.33 * t))),
    ),
    Knob(
        "local_value",
        None,
        "STRING: the distance the shifted keys start at",
        integer=True,
        derived=FromTrained("128, at most shifted_offset/2", lambda t, k: min(128, k["shifted_offset"] // 2)),
    ),
    Knob(
        "attention_factor",
        1 + 0.1 * math.log(2),
        "STRING: queries and keys x it, logits x its square; 1 off",
        inclusive=False,
    ),
)


def _yarn_betas_ordered(knobs: dict) -> str | None:
    if knobs["beta_fast"] <= knobs["beta_slow"]:
        return (
            f"beta_fast={knobs['beta_fast']!r} must be above beta_slow={knobs['beta_slow']!r} (YaRN interpolates "
            "dimensions that turn fewer than beta_slow times and keeps those that turn more than beta_fast times)"
        )
    return None


YARN_KNOBS = (FACTOR, BETA_FAST, BETA_SLOW)
CATALOG: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the catalogue (replacing one of the same name); returns it.

    A knob name means one thing in the whole catalogue: a knob that shares its name with another method's must
    have the same type and bounds (its default may differ), so one config key serves both.
    """
    for knob in method.knobs:
        for other in CATALOG.values():
            twin = next((k for k in other.knobs if k.name == knob.name), None)
            if twin is not None and other.name != method.name and _shape(twin) != _shape(knob):
                raise ValueError(
                    f"knob {knob.name!r} of method {method.name!r} differs in type or bounds from {other.name!r}'s; "
                    f"give it another name or the same kind of values"
                )
    CATALOG[method.name] = method
    return method


def _shape(knob: Knob) -> tuple:
    return (knob.integer, knob.minimum, knob.inclusive, knob.choices)


for _method in (
    Method("none", does="the model as it ships", formula="inv_freq_k = base^(-2k/d)", reach="T"),
    Method(
        "linear",
        (FACTOR,),
        _linear,
        does="position interpolation",
        formula="positions / factor",
        reach="factor·T",
    ),
    Method(
        "ntk",
        (ALPHA,),
        _ntk,
        does="static NTK-aware base",
        formula="base' = base·alpha^(d/(d-2))",
        reach="~alpha·T",
    ),
    Method(
        "dynamic_ntk",
        (ALPHA, _bucket(1)),
        _dynamic_ntk,
        dynamic=True,
        does="transformers' dynamic NTK: one base per forward, from its longest position (of the whole batch); "
        "cached keys keep the base they were written with",
        formula="base' = base·(alpha·L/T - (alpha-1))^(d/(d-2)) for L > T, L = the forward's longest position + 1",
        reach="any, degrading slowly",
    ),
    Method(
        "consistent_ntk",
        # bucket 256: a 16k forward past an 8k trained length runs 33 query groups instead of 8193
        (ALPHA, _bucket(256), SCHEDULE),
        _dynamic_ntk,
        dynamic=True,
        consistent=True,
        does="the original enhance-long's method, fixed: each query and **every key it reads** use the base of the query's own length "
        "(`schedule=per_forward`: of the forward's longest position, the original tool)",
        formula="dynamic NTK's base with L = i+1 per query (per row of a batch)",
        reach="any, degrading slowly",
    ),
    Method(
        "yarn",
        YARN_KNOBS,
        _yarn,
        does="YaRN (transformers' own function)",
        formula="NTK-by-parts + attention scale 0.1·ln(factor)+1",
        reach="factor·T",
        checks=(_yarn_betas_ordered,),
    ),
    Method(
        "ntk_by_parts",
        YARN_KNOBS,
        _ntk_by_parts,
        does="the YaRN paper's NTK-by-parts: YaRN's frequencies without its temperature (not the older three-way "
        "blend of jquesnelle's first release)",
        formula="interpolate wavelengths > T/beta_slow by factor, keep < T/beta_fast, ramp between",
        reach="factor·T",
        checks=(_yarn_betas_ordered,),
    ),
    Method(
        "dynamic_yarn",
        (BETA_FAST, BETA_SLOW, _bucket(256), SCHEDULE),
        _dynamic_yarn,
        dynamic=True,
        consistent=True,
        does="YaRN with factor = L/T per query, consistent like `consistent_ntk` (same `schedule`)",
        formula="factor = max(1, (i+1)/T)",
        reach="any",
        checks=(_yarn_betas_ordered,),
    ),
    Method(
        "self_extend",
        (Knob("group", 4, "keys merged per position", integer=True, minimum=1), _window(1024)),
        views=lambda k: beyond_window(k["window"], self_extend_positions(k["group"], k["window"])),
        does="Self-Extend (Jin et al. 2024): grouped attention",
        formula="rel = i-j if i-j < window, else (i//group + window - window//group) - j//group",
        reach="(T-window)·group + window",
    ),
    Method(
        "rerope",
        (_window(2048),),
        views=lambda k: beyond_window(k["window"], rerope_positions(k["window"])),
        does="ReRoPE (Su 2023)",
        formula="rel = min(i-j, window)",
        reach="any",
    ),
    Method(
        "leaky_rerope",
        (_window(2048), Knob("leak", 16.0, "slope 1/leak beyond the window", minimum=1.0)),
        views=lambda k: beyond_window(k["window"], leaky_rerope_positions(k["window"], k["leak"])),
        does="leaky ReRoPE",
        formula="rel = i-j if i-j < window, else window + (i-j-window)/leak",
        reach="window + (T-window)·leak",
    ),
    Method(
        "dual_chunk",
        DUAL_CHUNK_KNOBS,
        views=lambda k: dual_chunk_views(k["chunk_size"], k["local_window"]),
        attention_scale=lambda k, positions, t: chunk_attention_scale(positions, t, k["mscale"]),
        does="Dual Chunk Attention (ChunkLlama, An et al. 2024): intra-, successive- and inter-chunk positions in "
        "one softmax",
        formula="s = chunk_size - local_window; rel = i-j in j's chunk (i//s = j//s), min(i-j, chunk_size - j%s) in "
        "the previous one, min(2s-1, chunk_size) - j%s before it; logits × (1 + mscale·ln((i+1)/T))² for i+1 > T",
        reach="any (every rel <= chunk_size)",
        checks=(_below("local_window", "chunk_size", "the chunk period is chunk_size - local_window"),),
    ),
    Method(
        "string",
        STRING_KNOBS,
        views=lambda k: string_views(k["shifted_offset"], k["local_value"]),
        attention_scale=lambda k, positions, t: constant_attention_scale(positions, k["attention_factor"]),
        does="STRING (An et al. 2024): shifts the well-trained small distances over the rarely trained large ones",
        formula="rel = i-j if i-j < shifted_offset, else i-j - shifted_offset + local_value; logits × "
        "attention_factor²",
        reach="T, used better; rel < T up to T + shifted_offset - local_value",
        checks=(_below("local_value", "shifted_offset", "shifted distances must land below where they came from"),),
    ),
    Method(
        "lm_infinite",
        (
            _window(None, FromTrained("T", lambda t, k: t)),
            Knob("n_global", 10, "LM-Infinite: the first tokens every query reads, at distance window", integer=True),
        ),
        views=lambda k: lambda_views(k["window"], k["n_global"]),
        does="LM-Infinite (Han et al. 2024): Λ-shaped attention, the first n_global tokens and a window, distances "
        "capped",
        formula="rel = i-j if i-j < window; window if j < n_global; other keys not read",
        reach="any, reading n_global + window keys",
    ),
    Method(
        "attention_sink",
        (
            Knob("n_sink", 4, "attention sinks: the first tokens every query reads", integer=True),
            _window(None, FromTrained("T - n_sink", lambda t, k: t - k["n_sink"])),
        ),
        views=lambda k: sink_views(k["n_sink"], k["window"]),
        does="StreamingLLM (Xiao et al. 2024): n_sink attention sinks and a recent window, positions by cache slot",
        formula="rel = i-j if i-j < window; min(i, n_sink+window-1) - j if j < n_sink; other keys not read",
        reach="any, reading n_sink + window keys",
    ),
):
    register_method(_method)

DEFAULT_ROPE = "consistent_ntk"


class _Defaults(Mapping):
    """``METHODS``: method name -> its default knobs, read live from the catalogue (registered methods too)."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        return CATALOG[name].defaults

    def __iter__(self) -> Iterator[str]:
        return iter(CATALOG)

    def __len__(self) -> int:
        return len(CATALOG)


METHODS: Mapping[str, dict[str, Any]] = _Defaults()


def knob_specs() -> dict[str, Knob]:
    """Every knob name in the catalogue with its spec (the first method's, which every other one agrees with)."""
    specs: dict[str, Knob] = {}
    for method in CATALOG.values():
        for knob in method.knobs:
            specs.setdefault(knob.name, knob)
    return specs


def check_knobs(method: Method, knobs: dict[str, Any], train_len: int) -> dict[str, Any]:
    """``method``'s knobs with defaults filled in (those derived from the trained length ``train_len`` too), checked;
    a bad value is a one-line ``ValueError``."""
    unknown = sorted(set(knobs) - {knob.name for knob in method.knobs})
    if unknown:
        takes = ", ".join(knob.name for knob in method.knobs) or "no knobs"
        raise ValueError(f"rope={method.name!r} does not take {', '.join(unknown)}; it takes {takes}")
    values = {**method.defaults, **{k: v for k, v in knobs.items() if v is not None}}
    for knob in method.knobs:
        derived = values[knob.name] is None and knob.derived is not None
        if derived:
            values[knob.name] = knob.derived.of(train_len, values)
        if not knob.valid(values[knob.name]):
            origin = f" (its default {knob.derived.text} at train_len={train_len}; set it)" if derived else ""
            raise ValueError(
                f"{knob.name}={values[knob.name]!r}{origin} is invalid for rope={method.name!r}; "
                f"it must be {knob.requirement}"
            )
    for check in method.checks:
        problem = check(values)
        if problem:
            raise ValueError(f"{problem}; rope={method.name!r}")
    return values


def methods_table() -> str:
    """The README's methods table, from the catalogue."""
    lines = [
        "| `rope=` | what it does | formula | knobs (default) | meant to reach |",
        "|---|---|---|---|---|",
    ]
    for method in CATALOG.values():
        knobs = ", ".join(f"`{k.name}` ({_shown(k)})" for k in method.knobs) or "--"
        lines.append(f"| `{method.name}` | {method.does} | {method.formula} | {knobs} | {method.reach} |")
    return "\n".join(lines) + "\n"


def _shown(knob: Knob) -> str:
    value = knob.default
    if value is None and knob.derived is not None:
        return knob.derived.text
    return f"{value:g}" if isinstance(value, int | float) else str(value)
