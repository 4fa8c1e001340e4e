"""Decode cost per token with a long cache: consistent_ntk vs transformers' built-in dynamic NTK vs the stock model,
and the remapping methods vs the stock model.

    python -m bench.decode --quick                 # tiny random Llama (T=128), 256 and 512 cached tokens
    python -m bench.decode --threads 1             # SmolLM2 (T=8192), 8192 and 16384 cached tokens
    python -m bench.decode --threads 1 --dtype bfloat16   # the same in bfloat16 (torch's CPU bf16 kernels)
    python -m bench.decode --threads 1 --cached 16384 --steps 64 --methods dual_chunk string lm_infinite

Cases, all on the same weights in one process, interleaved:

* ``stock``: the model as it ships;
* ``builtin_dynamic``: transformers' ``rope_type="dynamic"`` rotary embedding swapped in (cached keys keep the base
  they were written with: the inconsistency transformers declined to fix);
* ``consistent_ntk``: the default bucket (256): the cache holds keys before RoPE and the attention reads a rotated
  copy beside it, derived again from the unrotated keys once every ``bucket`` tokens;
* ``consistent_ntk+logn``: the same with LogN, as ``enhance_long.apply(model)`` installs it;
* ``consistent_ntk[bucket=1]``: the exact per-token schedule, which derives every cached key again at every step:
  the cost of the naive fix (rotating all keys each step), i.e. the floor to beat;
* any other method named in ``--methods`` (LogN off), e.g. the remapping ones: each decoded token runs its views
  as kernel pieces over the cache.

Each case gets a fresh cache of N random keys/values (untimed; decoding cost does not depend on the values), then
decodes ``--steps`` tokens one forward each (timed). A fresh cache has no rotated copy yet, so the consistent cases
derive it at their first step, exactly as they do when the base moves at a bucket boundary: a block of ``bucket``
steps holds exactly one derivation, and its mean is the amortized cost per token. The exact schedule costs the same
at every step, so its block is shorter (``--exact-steps``).
Targets: consistent_ntk within 1.05x of builtin_dynamic; every other method within 1.1x of stock.
"""

from __future__ import annotations

import torch

import enhance_long
from bench.common import (
    Case,
    builtin_dynamic_rotary,
    compare,
    interleaved,
    load,
    parser,
    random_cache,
    report,
    start,
    table,
)

TARGET = 1.05
TARGET_VS_STOCK = 1.1  # the methods other than consistent_ntk
ALPHA = 2.0


class Switch:
    """Puts the one model in each case's state: stock, transformers' dynamic rotary, or an enhance_long method."""

    def __init__(self, model, train_len: int):
        self.model, self.train_len = model, train_len
        self.decoder = model.get_decoder()
        self.stock_rotary = self.decoder.rotary_emb
        self.builtin_rotary = builtin_dynamic_rotary(model, ALPHA)

    def stock(self):
        enhance_long.remove(self.model)
        self.decoder.rotary_emb = self.stock_rotary

    def builtin(self):
        self.stock()
        self.decoder.rotary_emb = self.builtin_rotary

    def method(self, **settings):
        self.stock()
        enhance_long.apply(self.model, train_len=self.train_len, **settings)


def decode_cases(model, switch: Switch, cached: int, steps: int, exact_steps: int, methods=("consistent_ntk",)):
    token = torch.tensor([[1]], device=model.get_input_embeddings().weight.device)
    state: dict = {}

    def prepared(set_state, **settings):
        def prepare():
            state.clear()  # drop the previous case's cache before building the next
            set_state(**settings)
            state["cache"] = random_cache(model, cached)

        return prepare

    def decode(n: int):
        def run():
            with torch.inference_mode():
                for _ in range(n):
                    model(input_ids=token, cache=state["cache"], use_cache=True, logits_to_keep=1)

        return run

    bucket = enhance_long.METHODS["consistent_ntk"]["bucket"]
    consistent = {"rope": "consistent_ntk", "alpha": ALPHA}
    cases = [
        Case("stock", decode(steps), prepared(switch.stock), steps),
        Case("builtin_dynamic", decode(steps), prepared(switch.builtin), steps),
    ]
    for rope in methods:
        if rope != "consistent_ntk":
            cases.append(Case(rope, decode(steps), prepared(switch.method, rope=rope, logn=False), steps))
            continue
        cases += [
            Case(
                f"consistent_ntk[bucket={bucket}]",
                decode(steps),
                prepared(switch.method, **consistent, logn=False),
                steps,
            ),
            Case(
                f"consistent_ntk+logn[bucket={bucket}]",
                decode(steps),
                prepared(switch.method, **consistent, logn=True),
                steps,
            ),
            Case(
                "consistent_ntk[bucket=1]",
                decode(exact_steps),
                prepared(switch.method, **consistent, logn=False, bucket=1),
                exact_steps,
            ),
        ]
    return cases


def measure(
    model,
    train_len: int,
    cached_lengths,
    steps: int,
    exact_steps: int,
    n_repeats: int,
    warmup: int,
    methods=("consistent_ntk",),
):
    """One row per (cached length, case): ms per token, tokens/s, paired ratios to builtin_dynamic and stock, and
    on a GPU the peak memory allocated (GiB)."""
    switch = Switch(model, train_len)
    rows = []
    for cached in cached_lengths:
        cases = decode_cases(model, switch, cached, steps, exact_steps, methods)
        peaks: dict[str, int] = {}
        samples = interleaved(cases, n_repeats, warmup, peaks)
        switch.stock()
        for case in cases:
            stats = {**compare(samples, case.name, "builtin_dynamic"), **compare(samples, case.name, "stock")}
            row = {"cached": cached, "case": case.name, "steps": case.units, **stats}
            row["ms_per_token"] = 1000 * row.pop("seconds")
            row["tokens_per_s"] = 1000 / row["ms_per_token"]
            if case.name in peaks:
                row["peak_gib"] = peaks[case.name] / 2**30
            if case.name.startswith("consistent_ntk") and "bucket=1]" not in case.name:
                row["target_met"] = row["vs_builtin_dynamic"] <= TARGET
            elif case.name in enhance_long.METHODS:
                row["target_met"] = row["vs_stock"] <= TARGET_VS_STOCK
            rows.append(row)
    return rows


def main() -> None:
    p = parser("decode", __doc__)
    p.add_argument("--cached", type=int, nargs="+", help="cached tokens (default 256 512 quick, else 8192 16384)")
    p.add_argument("--steps", type=int, help="decoded tokens per timed block (default: the default bucket, 256)")
    p.add_argument("--exact-steps", type=int, default=16, help="block length of the bucket=1 case")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per length before the timed ones")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["consistent_ntk"],
        help="methods to time beside stock and builtin_dynamic (consistent_ntk: its three cases; others LogN off)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    args = p.parse_args()
    unknown = sorted(set(args.methods) - set(enhance_long.METHODS))
    if unknown:
        raise SystemExit(f"--methods {' '.join(unknown)} unknown; choose from {', '.join(enhance_long.METHODS)}")
    n_repeats = start(args)
    steps = args.steps or enhance_long.METHODS["consistent_ntk"]["bucket"]
    if steps < 1 or args.exact_steps < 1:
        raise SystemExit(f"--steps={steps} / --exact-steps={args.exact_steps} are invalid; give integers >= 1")
    model, _, train_len = load(args.quick)
    model.to(getattr(torch, args.dtype))
    cached = args.cached or ([256, 512] if args.quick else [8192, 16384])
    rows = measure(model, train_len, cached, steps, args.exact_steps, n_repeats, args.warmup, args.methods)
    columns = [
        "cached",
        "case",
        "steps",
        "ms_per_token",
        "tokens_per_s",
        "vs_builtin_dynamic",
        "vs_builtin_dynamic_min",
        "vs_builtin_dynamic_max",
        "vs_stock",
        "target_met",
    ]
    settings = {"train_len": train_len, "alpha": ALPHA, "steps": steps, "exact_steps": args.exact_steps}
    settings |= {"repeats": n_repeats, "warmup": args.warmup, "attention": "sdpa", "dtype": args.dtype}
    settings |= {"methods": args.methods}
    text = (
        f"decode, T={train_len}, {args.dtype}, {n_repeats} repeats, target <= {TARGET}x builtin_dynamic "
        f"(consistent_ntk), <= {TARGET_VS_STOCK}x stock (others)\n"
    )
    targets = {"target": TARGET, "target_vs_stock": TARGET_VS_STOCK}
    report("decode", args, {"settings": settings, **targets, "rows": rows}, text + table(rows, columns))


if __name__ == "__main__":
    main()
