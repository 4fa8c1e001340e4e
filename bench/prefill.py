"""Prefill overhead: one forward over a whole prompt, every method (LogN on and off) against the stock model.

    python -m bench.prefill --quick                        # tiny random Llama, T=128, lengths 128 and 256
    python -m bench.prefill                                # SmolLM2 (T=8192) at 2k/4k/8k/16k (hours on a 2-core CPU)
    python -m bench.prefill --lengths 1024 --train-len 512 --repeats 2    # past-T behaviour at a CPU-sized length
    python -m bench.prefill --lengths 16384 --layers 4 --logn off        # T=8192, 4 of the 30 layers: ~8x faster

Same weights, same backend, one process: each case applies its method (untimed), runs
``model(ids, use_cache=False, logits_to_keep=1)`` (timed) and the stock model runs the same call unpatched,
before and after every case (each case's ratio is to the mean of those two, so slow drifts of a shared machine
cancel).
Up to the trained length T every method except linear/ntk/yarn computes the stock model, so the ratios that matter
are past T; ``--train-len`` lowers T (the ``train_len`` knob of ``enhance_long.apply``) to get there at a length a
CPU can afford. Target: <= 1.02x for every method on sdpa.
"""

from __future__ import annotations

import torch

import enhance_long
from bench.common import Case, compare, keep_layers, load, parser, report, sandwiched, start, table

TARGET = 1.02


def method_cases(model, ids: torch.Tensor, train_len: int, methods, logn_options) -> list[Case]:
    """The stock model and each (method, LogN) setting as timed cases of one prefill forward."""

    def forward():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    cases = [Case("stock", forward, prepare=lambda: enhance_long.remove(model))]
    for rope in methods:
        for logn in logn_options:
            settings = {"rope": rope, "logn": logn, "train_len": train_len}
            cases.append(Case(label(rope, logn), forward, prepare=lambda s=settings: enhance_long.apply(model, **s)))
    return cases


def label(rope: str, logn: bool) -> str:
    return f"{rope}+logn" if logn else rope


def measure(model, train_len: int, lengths, methods, logn_options, n_repeats: int, warmup: int) -> list[dict]:
    """One row per (length, case): median seconds, tokens/s, the paired ratio to the stock model and, on a GPU,
    the peak memory allocated (GiB)."""
    rows = []
    vocab = model.config.vocab_size
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(model.get_input_embeddings().weight.device)
        cases = method_cases(model, ids, train_len, methods, logn_options)
        peaks: dict[str, int] = {}
        samples, ratios = sandwiched(cases, n_repeats, warmup, peaks)
        enhance_long.remove(model)
        for case in cases:
            stats = compare(samples, case.name, "stock", ratios.get(case.name))
            row = {"length": length, "case": case.name, **stats, "tokens_per_s": length / stats["seconds"]}
            if case.name in peaks:
                row["peak_gib"] = peaks[case.name] / 2**30
            if case.name != "stock":
                row["target_met"] = stats["vs_stock"] <= TARGET
            rows.append(row)
    return rows


def main() -> None:
    p = parser("prefill", __doc__)
    p.add_argument(
        "--lengths", type=int, nargs="+", help="prompt lengths (default 128 256 quick, else 2048 4096 8192 16384)"
    )
    p.add_argument("--methods", nargs="+", default=list(enhance_long.METHODS), help="rope methods to patch in")
    p.add_argument("--train-len", type=int, help="T the methods extend from (default: the model's trained length)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per length before the timed ones")
    p.add_argument("--logn", choices=("both", "on", "off"), default="both", help="LogN settings to time per method")
    p.add_argument(
        "--layers",
        type=int,
        help="keep only the first N decoder layers (real weights): every layer runs the same code, so the ratio "
        "holds at a fraction of the time; per-forward costs are then shared by fewer layers (a pessimistic ratio)",
    )
    args = p.parse_args()
    unknown = sorted(set(args.methods) - set(enhance_long.METHODS))
    if unknown:
        raise SystemExit(f"--methods {' '.join(unknown)} unknown; choose from {', '.join(enhance_long.METHODS)}")
    lengths = args.lengths or ([128, 256] if args.quick else [2048, 4096, 8192, 16384])
    n_repeats = start(args)
    model, _, trained = load(args.quick)
    if args.layers is not None:
        keep_layers(model, args.layers)
    train_len = args.train_len or trained
    logn_options = {"both": (False, True), "on": (True,), "off": (False,)}[args.logn]
    rows = measure(model, train_len, lengths, args.methods, logn_options, n_repeats, args.warmup)
    columns = ["length", "case", "seconds", "tokens_per_s", "vs_stock", "vs_stock_min", "vs_stock_max", "target_met"]
    settings = {
        "train_len": train_len,
        "repeats": n_repeats,
        "warmup": args.warmup,
        "attention": "sdpa",
        "layers": model.config.num_hidden_layers,
        "pairing": "sandwiched: each case between two stock runs",
    }
    text = f"prefill, T={train_len}, {n_repeats} repeats, target <= {TARGET}x stock\n" + table(rows, columns)
    report("prefill", args, {"settings": settings, "target": TARGET, "rows": rows}, text)


if __name__ == "__main__":
    main()
