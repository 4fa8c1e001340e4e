"""Peak memory of the perplexity task on one window vs a naive ``model(ids, labels=ids)`` forward, on a CPU.

    python -m bench.memory --quick                    # tiny random Llama, one 1024-token window
    python -m bench.memory --threads 1                # SmolLM2, one 16384-token Canterbury window
    python -m bench.memory --ctx 8192 --ropes none    # a length and methods of your choice

Each measurement runs in a fresh subprocess (``--child``): it loads the model and the window's tokens, resets the
resident-set high-water mark, runs the measured call under ``torch.inference_mode`` and reports the peak minus the
resident set just before it. The naive forward builds the full ``ctx x vocab`` float32 logits and its
cross-entropy; the task (``enhance_long.tasks.perplexity``, ``task.chunk`` positions per lm_head call) scores the
same window from the decoder's hidden states. Target: task <= 0.5x naive.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import enhance_long
from bench.common import ROOT, in_subprocess, load, parser, peak_rss, report, reset_peak_rss, start, table

TARGET = 0.5


def child(args) -> None:
    """Measure one (mode, rope) in this process and print one JSON line."""
    from omegaconf import OmegaConf

    from enhance_long.tasks.base import TaskEnv
    from enhance_long.tasks.perplexity import TASK

    model, tokenizer, train_len = load(args.quick)
    task_cfg = OmegaConf.load(ROOT / "conf" / "task" / "perplexity.yaml")
    task_cfg.pop("defaults")
    task_cfg.max_windows = 1
    data_cfg = OmegaConf.load(ROOT / "conf" / "data" / "canterbury.yaml")
    env = TaskEnv(model, tokenizer, task_cfg, data_cfg, ROOT, progress=False)
    ids = TASK.documents(env, args.ctx).docs[0].ids[: args.ctx]
    if args.rope != "none":
        enhance_long.apply(model, rope=args.rope, train_len=train_len)
    before = reset_peak_rss()
    started = time.perf_counter()
    with torch.inference_mode():
        if args.child == "naive":
            loss = float(model(input_ids=ids[None], labels=ids[None]).loss)
        else:
            rows = TASK.measure(env, {"ctx": args.ctx})
            loss = float(rows[-1]["nll"] / rows[-1]["tokens"])
    seconds = time.perf_counter() - started
    peak = peak_rss()
    print(json.dumps({"peak_bytes": peak - before, "rss_before_bytes": before, "seconds": seconds, "loss": loss}))


def main() -> None:
    p = parser("memory", __doc__)
    p.add_argument("--ctx", type=int, help="window length (default 1024 quick, else 16384)")
    p.add_argument("--ropes", nargs="+", default=["none", "consistent_ntk"], help="methods the task runs with")
    p.add_argument("--child", choices=["naive", "task"], help=argparse.SUPPRESS)
    p.add_argument("--rope", default="none", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.ctx = args.ctx or (1024 if args.quick else 16384)
    start(args, full=1)
    if args.child:
        child(args)
        return
    unknown = sorted(set(args.ropes) - set(enhance_long.METHODS))
    if unknown:
        raise SystemExit(f"--ropes {' '.join(unknown)} unknown; choose from {', '.join(enhance_long.METHODS)}")
    common = ["--ctx", str(args.ctx), *(["--quick"] if args.quick else [])]
    common += ["--threads", str(torch.get_num_threads())]
    naive = in_subprocess("bench.memory", [*common, "--child", "naive"])
    rows = [{"case": "naive model(ids, labels=ids)", "rope": "none", **naive}]
    for rope in args.ropes:
        measured = in_subprocess("bench.memory", [*common, "--child", "task", "--rope", rope])
        rows.append({"case": "perplexity task", "rope": rope, **measured})
    for row in rows:
        row["peak_mib"] = row["peak_bytes"] / 2**20
        row["vs_naive"] = row["peak_bytes"] / naive["peak_bytes"]
        if row["case"] == "perplexity task":
            row["target_met"] = row["vs_naive"] <= TARGET
    columns = ["case", "rope", "peak_mib", "vs_naive", "target_met", "seconds", "loss"]
    text = f"memory (peak RSS above the loaded model), ctx={args.ctx}, target <= {TARGET}x naive\n"
    report("memory", args, {"settings": {"ctx": args.ctx}, "target": TARGET, "rows": rows}, text + table(rows, columns))


if __name__ == "__main__":
    main()
