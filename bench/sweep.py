"""Sweep cost: a methods x lengths perplexity sweep as one ``run.py -m`` vs one ``run.py`` call per cell.

    python -m bench.sweep --quick                 # tiny random Llama, 2 methods x 2 lengths (128 256)
    python -m bench.sweep --threads 1             # SmolLM2, 3 methods x 3 lengths (1024 2048 4096), one window each

Both sides run the same cells (``--ropes`` x ``--lengths``, ``baseline=false``, ``task.max_windows=1``) into
fresh folders of a temporary directory, so nothing is resumed. The sweep is one process: Python, torch and
transformers are imported once, each method's job loads the model once for all its lengths. The separate calls
pay process start, imports and model loading once per cell. (``--quick`` is 2 x 2: a ``run.py`` process alone
takes 5-25 s to start on a busy 2-core CPU.) Each repeat runs both
sides, in alternating order; ``--threads`` is passed on as ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, parser, report, start, table


def timed_run(arguments: list[str], env: dict) -> float:
    """Seconds one ``python run.py ...`` takes; a failure exits with its last error line."""
    command = [sys.executable, "run.py", *arguments]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}): {last}")
    return time.perf_counter() - started


def sides(model: str, ropes: list[str], lengths: list[int], work: Path, env: dict, repeat: int) -> dict[str, float]:
    common = [f"model={model}", "baseline=false", "progress=false", "task.max_windows=1"]
    ctxs = "ctxs=[" + ",".join(map(str, lengths)) + "]"

    def sweep() -> float:
        return timed_run(["-m", f"rope={','.join(ropes)}", ctxs, *common, f"hydra.sweep.dir={work}/sweep{repeat}"], env)

    def separate() -> float:
        total = 0.0
        for rope in ropes:
            for ctx in lengths:
                out = f"hydra.run.dir={work}/separate{repeat}/{rope}_{ctx}"
                total += timed_run([f"rope={rope}", f"ctx={ctx}", *common, out], env)
        return total

    order = [("sweep", sweep), ("separate", separate)]
    return {name: run() for name, run in (order if repeat % 2 == 0 else order[::-1])}


def main() -> None:
    p = parser("sweep", __doc__)
    p.add_argument("--lengths", type=int, nargs="+", help="lengths (default 128 256 quick, else 1024 2048 4096)")
    p.add_argument("--ropes", nargs="+", help="methods (default none consistent_ntk quick, else + dynamic_ntk)")
    args = p.parse_args()
    n_repeats = start(args, full=1)
    lengths = args.lengths or ([128, 256] if args.quick else [1024, 2048, 4096])
    ropes = args.ropes or (["none", "consistent_ntk"] if args.quick else ["none", "dynamic_ntk", "consistent_ntk"])
    model = "tiny_random" if args.quick else "smollm2_135m"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONWARNINGS="ignore")
    if args.threads or args.quick:
        env["OMP_NUM_THREADS"] = str(args.threads or 1)
    samples: dict[str, list[float]] = {"sweep": [], "separate": []}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as work:
        for repeat in range(n_repeats):
            for name, seconds in sides(model, ropes, lengths, Path(work), env, repeat).items():
                samples[name].append(seconds)
    cells = len(ropes) * len(lengths)
    ratios = [s / b for s, b in zip(samples["separate"], samples["sweep"], strict=True)]
    rows = [
        {
            "side": f"run.py -m (one process, {cells} cells)",
            "seconds": statistics.median(samples["sweep"]),
            "ratio": 1.0,
        },
        {
            "side": f"{cells} x run.py",
            "seconds": statistics.median(samples["separate"]),
            "ratio": statistics.median(ratios),
        },
    ]
    settings = {"model": model, "lengths": lengths, "ropes": ropes, "repeats": n_repeats}
    settings["omp_num_threads"] = env.get("OMP_NUM_THREADS")
    text = f"sweep, {model}, lengths {lengths}, {n_repeats} repeats (ratio: time / one-process sweep)\n"
    report("sweep", args, {"settings": settings, "samples": samples, "rows": rows}, text + table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
