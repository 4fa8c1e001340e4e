"""Does consistent_ntk's bucket (default 256) move perplexity? bucket=1 (exact schedule) vs 64 / 256 / 1024.

    python -m bench.bucket --quick                           # tiny random Llama (T=128), 128 tokens past T
    python -m bench.bucket --threads 1                       # SmolLM2 (T=8192), Canterbury, 1024 tokens past T
    python -m bench.bucket --tail 512 --docs 2 --threads 1   # what a busy 2-core CPU affords

Each of ``--docs`` Canterbury documents gives one window of T + ``--tail`` tokens. The first T tokens are the same
for every bucket (up to T the base is the stock one), so they are prefilled once per document with the stock
model into a ``DynamicCache``; each setting then runs the tail as one forward on a copy of that cache
(consistent_ntk re-rotates the cached keys to its base and groups the tail's queries by base). That is the
cached-chunk path, which equals one forward over the whole window by construction (tests/test_patch.py); it
avoids re-running the T-token prefill per bucket. Scored: the tail's labels (positions T+1 .. T+tail-1), the only
ones a bucket can change. LogN is on (``enhance_long.apply``'s default); ``none`` (the stock model
extrapolating) is the scale reference.

Noise: a perplexity over n tokens is uncertain by its standard error, exp(mean NLL +- std/sqrt(n)); a bucket moves
the figure beyond noise when its paired per-token NLL difference to bucket=1 exceeds 2 standard errors.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import enhance_long
from bench.common import ROOT, load, parser, report, start, table

NOISE_SE = 2.0  # standard errors


def tail_nll(model, cache, tail: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of tail[1:] from one cached forward over ``tail`` (float64)."""
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=tail[None], cache=cache, use_cache=True).last_hidden_state
        logits = model.get_output_embeddings()(hidden[0, :-1]).float()
        return F.cross_entropy(logits, tail[1:], reduction="none").double()


def measure(model, tokenizer, train_len: int, tail_len: int, n_docs: int, buckets) -> tuple[dict, int]:
    """Per-token NLLs for each setting, concatenated over documents; and the documents used."""
    from enhance_long.data import load_documents

    data_cfg = OmegaConf.load(ROOT / "conf" / "data" / "canterbury.yaml")
    docs = load_documents(data_cfg, tokenizer, min_tokens=train_len + tail_len).docs[:n_docs]
    if not docs:
        raise SystemExit(f"no Canterbury document has {train_len + tail_len} tokens; lower --tail")
    settings = {"none": None} | {f"bucket={b}": {"rope": "consistent_ntk", "bucket": b} for b in buckets}
    nll: dict[str, list[torch.Tensor]] = {name: [] for name in settings}
    for doc in docs:
        enhance_long.remove(model)
        prefilled = _prefill(model, doc.ids[:train_len])
        for name, apply_kwargs in settings.items():
            enhance_long.remove(model)
            if apply_kwargs is not None:
                enhance_long.apply(model, train_len=train_len, **apply_kwargs)
            nll[name].append(tail_nll(model, copy.deepcopy(prefilled), doc.ids[train_len : train_len + tail_len]))
        enhance_long.remove(model)
    return {name: torch.cat(values) for name, values in nll.items()}, len(docs)


def _prefill(model, ids: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model.get_decoder()(input_ids=ids[None], cache=cache, use_cache=True)
    return cache


def rows_from(nll: dict[str, torch.Tensor]) -> list[dict]:
    exact = nll["bucket=1"]
    rows = []
    for name, values in nll.items():
        n = values.numel()
        mean, se = float(values.mean()), float(values.std() / math.sqrt(n))
        delta = values - exact
        delta_mean, delta_se = float(delta.mean()), float(delta.std() / math.sqrt(n))
        row = {"setting": name, "tokens": n, "ppl": math.exp(mean), "ppl_low": math.exp(mean - se)}
        row |= {"ppl_high": math.exp(mean + se), "ppl_vs_bucket1": math.exp(delta_mean)}
        row |= {"delta_nll": delta_mean, "delta_se": delta_se}
        if name != "bucket=1":
            row["beyond_noise"] = abs(delta_mean) > NOISE_SE * delta_se if delta_se > 0 else delta_mean != 0
        rows.append(row)
    return rows


def main() -> None:
    p = parser("bucket", __doc__)
    p.add_argument("--tail", type=int, help="tokens past T per window (default 128 quick, else 1024)")
    p.add_argument("--docs", type=int, default=4, help="Canterbury documents (one window each)")
    p.add_argument("--buckets", type=int, nargs="+", default=[1, 64, 256, 1024], help="buckets; 1 is required")
    args = p.parse_args()
    start(args, full=1)
    if 1 not in args.buckets or min(args.buckets) < 1:
        raise SystemExit(f"--buckets {args.buckets} is invalid; give integers >= 1 including 1 (the reference)")
    model, tokenizer, train_len = load(args.quick)
    tail = args.tail or (128 if args.quick else 1024)
    nll, n_docs = measure(model, tokenizer, train_len, tail, args.docs, args.buckets)
    rows = rows_from(nll)
    columns = ["setting", "tokens", "ppl", "ppl_low", "ppl_high", "ppl_vs_bucket1", "delta_nll", "delta_se"]
    settings = {"train_len": train_len, "tail": tail, "docs": n_docs, "ctx": train_len + tail, "noise_se": NOISE_SE}
    text = f"consistent_ntk bucket vs perplexity, ctx={train_len + tail} (T={train_len}), {n_docs} documents\n"
    report("bucket", args, {"settings": settings, "rows": rows}, text + table(rows, [*columns, "beyond_noise"]))


if __name__ == "__main__":
    main()
