"""Attention-call overhead: one layer's attention on its real inputs, patched against stock, many short repeats.

    python -m bench.attention --quick                                   # tiny random Llama, T=128
    python -m bench.attention --lengths 16384                           # SmolLM2 (T=8192), layer 0 at 16k
    python -m bench.attention --lengths 4096 --train-len 2048 --methods consistent_ntk rerope

The prefill benchmark times whole forwards, which on a shared CPU scatter by +-5-10% however they are paired. The
attention call is the only part of a layer a method changes (the projections, MLP and norms run the same code),
so this times just that call: each method's model runs one forward through its first layer to capture the
attention inputs (queries and keys rotated by the method, the forward's plan), then the captured call and the
stock ``sdpa`` call on the stock model's captured inputs are timed, each case between two stock calls. A call is
~1 s at 16k rather than minutes per forward, so many repeats fit. What it leaves out: per-forward work shared by
all layers (the pre-hook, the memo of group rotations, formed by the first layer and reused by the others: about
0.3 s per 16k forward here, 0.2% of a 30-layer SmolLM2 forward), which is why the forward ratio is
``1 + (attention ratio - 1) * attention share`` only up to that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import enhance_long
from bench.common import Case, compare, keep_layers, load, parser, report, sandwiched, start, table


def captured_call(model, ids: torch.Tensor) -> Callable[[], None]:
    """The first layer's attention call in one forward of ``ids`` (through that layer only), as a replay."""
    name = model.config._attn_implementation
    attention = ALL_ATTENTION_FUNCTIONS[name]
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if not captured:
            captured.update(args=(module, query, key, value, attention_mask), kwargs=kwargs)
        return attention(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS._global_mapping[name] = capture
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping[name] = attention
    state = getattr(model, "_enhance_long", None)
    plan = state.plan if state is not None else None
    module = captured["args"][0]

    def run():
        if state is not None:  # this method's patch and forward plan, as every layer after the first sees them
            module._enhance_long, state.plan = state, plan
        with torch.inference_mode():
            attention(*captured["args"], **captured["kwargs"])

    return run


def measure(model, train_len: int, lengths, methods, n_repeats: int, warmup: int) -> list[dict]:
    rows = []
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(model.get_input_embeddings().weight.device)
        enhance_long.remove(model)
        cases = [Case("stock", captured_call(model, ids))]
        for rope in methods:
            enhance_long.apply(model, rope=rope, logn=False, train_len=train_len)
            cases.append(Case(rope, captured_call(model, ids)))
        enhance_long.remove(model)
        samples, ratios = sandwiched(cases, n_repeats, warmup)
        for case in cases:
            stats = compare(samples, case.name, "stock", ratios.get(case.name))
            rows.append({"length": length, "case": case.name, **stats})
    return rows


def main() -> None:
    p = parser("attention", __doc__)
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default 256 quick, else 16384)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["dynamic_ntk", "consistent_ntk", "dynamic_yarn", "self_extend", "rerope", "leaky_rerope"]
        + ["dual_chunk", "string", "lm_infinite", "attention_sink"],
        help="rope methods (default: those whose attention differs from stock past T, and dynamic_ntk as the control "
        "that runs the stock call: its spread is this machine's)",
    )
    p.add_argument("--train-len", type=int, help="T the methods extend from (default: the model's trained length)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    args = p.parse_args()
    unknown = sorted(set(args.methods) - set(enhance_long.METHODS))
    if unknown:
        raise SystemExit(f"--methods {' '.join(unknown)} unknown; choose from {', '.join(enhance_long.METHODS)}")
    n_repeats = start(args, full=10)
    model, _, trained = load(args.quick)
    keep_layers(model, 1)
    lengths = args.lengths or ([256] if args.quick else [16384])
    train_len = args.train_len or trained
    rows = measure(model, train_len, lengths, args.methods, n_repeats, args.warmup)
    columns = ["length", "case", "seconds", "vs_stock", "vs_stock_min", "vs_stock_max"]
    settings = {"train_len": train_len, "repeats": n_repeats, "warmup": args.warmup, "attention": "sdpa", "layer": 0}
    text = f"attention call of layer 0, T={train_len}, {n_repeats} repeats\n" + table(rows, columns)
    report("attention", args, {"settings": settings, "rows": rows}, text)


if __name__ == "__main__":
    main()
