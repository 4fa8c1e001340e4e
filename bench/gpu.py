"""The prefill and decode benchmarks on a CUDA GPU: a random-weight Llama-2-7B-shaped model in bfloat16.

    python -m bench.gpu                                # 8k/16k/32k, sdpa (+ flash_attention_2 where installed)
    python -m bench.gpu --quick                        # a small random Llama at 1k/2k: checks the wiring in seconds
    python -m bench.gpu --lengths 16384 --methods none consistent_ntk --steps 256   # a shorter device session

Without CUDA it prints one line and exits 0 (``--device cpu`` runs it anyway, to check the wiring on a CPU).
Model: Llama-2-7B's shape (32 layers, 32 heads of 128, MLP 11008, vocab 32000, trained length T=4096) with
random weights, built directly on the GPU: timing does not depend on the weights. For each attention backend it
runs ``bench.prefill`` (every method, LogN off/on, vs stock; target <= 1.02x) and ``bench.decode`` (consistent_ntk
vs transformers' dynamic NTK vs stock; target <= 1.05x) and reports absolute tokens/s and the peak GPU memory
allocated (``torch.cuda.max_memory_allocated``) per case.
"""

from __future__ import annotations

import importlib.util

import torch

import enhance_long
from bench import decode, prefill
from bench.common import parser, report, start, table
from enhance_long.methods import pieces

LLAMA2_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,  # = the trained length T
}
SMALL = {  # --quick: the same structure, small enough for any device
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}


def random_llama(shape: dict, device: str, dtype: torch.dtype, attention: str):
    """A random-weight Llama of ``shape``, initialised on ``device`` (no CPU copy of 7B weights), in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)
    return model.eval()


def backends() -> list[str]:
    """sdpa, and flash_attention_2 where flash-attn is installed and a GPU is present."""
    found = ["sdpa"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    return found


def main() -> None:
    p = parser("gpu", __doc__)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the wiring without a GPU")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt and cached lengths (default 8192 16384 32768)")
    p.add_argument("--methods", nargs="+", default=list(enhance_long.METHODS), help="methods in the prefill table")
    p.add_argument("--steps", type=int, help="decode block (default: the default bucket, 256)")
    p.add_argument("--exact-steps", type=int, default=16, help="decode block of the bucket=1 case")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per length")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench.gpu: skipped, no CUDA device (torch {torch.__version__}); --device cpu checks the wiring")
        return
    unknown = sorted(set(args.methods) - set(enhance_long.METHODS))
    if unknown:
        raise SystemExit(f"--methods {' '.join(unknown)} unknown; choose from {', '.join(enhance_long.METHODS)}")
    n_repeats = start(args)
    shape = SMALL if args.quick else LLAMA2_7B
    lengths = args.lengths or ([1024, 2048] if args.quick else [8192, 16384, 32768])
    steps = args.steps or enhance_long.METHODS["consistent_ntk"]["bucket"]
    train_len = shape["max_position_embeddings"]
    rows: dict[str, list[dict]] = {"prefill": [], "decode": []}
    for attention in backends() if args.device.startswith("cuda") else ["sdpa"]:
        model = random_llama(shape, args.device, torch.bfloat16, attention)
        found = prefill.measure(model, train_len, lengths, args.methods, (False, True), n_repeats, args.warmup)
        rows["prefill"] += [{"attention": attention, **row} for row in found]
        found = decode.measure(model, train_len, lengths, steps, args.exact_steps, n_repeats, args.warmup)
        rows["decode"] += [{"attention": attention, **row} for row in found]
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    # whether consistent groups and the two views ran as fused kernel pieces (else masked calls / matrix products)
    fused = pieces.fused(torch.empty(1, 1, 1, head_dim, device=args.device, dtype=torch.bfloat16))
    settings = {"shape": shape, "dtype": "bfloat16", "device": args.device, "train_len": train_len, "steps": steps}
    settings |= {"exact_steps": args.exact_steps, "repeats": n_repeats, "warmup": args.warmup, "fused_pieces": fused}
    prefill_columns = ["attention", "length", "case", "tokens_per_s", "vs_stock", "vs_stock_max", "peak_gib"]
    decode_columns = ["attention", "cached", "case", "ms_per_token", "tokens_per_s", "vs_builtin_dynamic"]
    text = (
        f"fused pieces on {args.device}: {fused}\n"
        f"gpu prefill (target <= {prefill.TARGET}x stock)\n"
        + table(rows["prefill"], [*prefill_columns, "target_met"])
        + f"\n\ngpu decode (target <= {decode.TARGET}x builtin_dynamic)\n"
        + table(rows["decode"], [*decode_columns, "vs_stock", "peak_gib", "target_met"])
    )
    payload = {"settings": settings, "targets": {"prefill": prefill.TARGET, "decode": decode.TARGET}, **rows}
    report("gpu", args, payload, text)


if __name__ == "__main__":
    main()
