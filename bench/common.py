"""What every benchmark shares: the models, interleaved timing, peak memory, the printed table and the JSON file.

Timing protocol: each repeat runs every case once, in an order rotated by one each repeat, so a slow spell of a
shared machine hits all cases alike. A case's ``prepare`` (apply or remove a method, build a cache) is not timed.
The ratio of a case to its reference is the median of the per-repeat ratios (paired: same repeat, adjacent in
time), reported with their min-max range as the noise band; seconds are the median over repeats. With
:func:`sandwiched` (prefill, attention) the reference runs before and after every case and each ratio is to the
mean of those two runs, which pairs tighter when one round takes many minutes.

Peak memory on a CPU is the process's resident-set high-water mark (``VmHWM``), reset to the current resident
set right before the measured call (``/proc/self/clear_refs``), in a fresh subprocess per measurement so two
measurements never share an allocator; on a GPU it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from enhance_long.results import machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` (tiny random model), ``--out``, ``--repeats``."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model: checks the wiring in under a minute")
    p.add_argument("--out", type=Path, help=f"JSON file (default bench/results/{name}[_quick].json)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default: 3)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 with --quick, else torch's own); on a busy "
        "machine 1 thread avoids OpenMP spin-waits that slow a 2-thread run by 3x or more",
    )
    return p


def start(args: argparse.Namespace, full: int = 3) -> int:
    """Apply ``--threads`` and return the number of timed repeats; a bad value exits with one line."""
    count = args.repeats or full
    if count < 1:
        raise SystemExit(f"--repeats={count} is invalid; give an integer >= 1")
    threads = args.threads or (1 if args.quick else None)
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads={threads} is invalid; give an integer >= 1")
        torch.set_num_threads(threads)
    return count


def model_config(name: str):
    """The ``conf/model/<name>.yaml`` mapping, as the runner would pass it to ``load_model``."""
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")


def load(quick: bool, attention: str = "sdpa"):
    """(model, tokenizer, trained length): the tiny random Llama with ``quick``, else the embedded SmolLM2."""
    from enhance_long import trained_length
    from enhance_long.models import load_model

    model, tokenizer = load_model(model_config("tiny_random" if quick else "smollm2_135m"), attention=attention)
    return model, tokenizer, trained_length(model.config)


def keep_layers(model, n: int) -> None:
    """Cut ``model`` to its first ``n`` decoder layers, in place; a bad count exits with one line."""
    layers = model.get_decoder().layers
    if not 1 <= n <= len(layers):
        raise SystemExit(f"--layers={n} is invalid; give an integer from 1 to {len(layers)} (the model's layers)")
    model.get_decoder().layers = layers[:n]
    model.config.num_hidden_layers = n


def builtin_dynamic_rotary(model, alpha: float) -> torch.nn.Module:
    """transformers' own dynamic NTK rotary embedding (``rope_type="dynamic"``, factor=alpha) for ``model``'s shape,
    to swap in for the stock one: the same weights then run transformers' built-in (cache-inconsistent) method."""
    import copy

    from enhance_long import trained_length

    config = copy.deepcopy(model.config)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "dynamic", "factor": float(alpha), "rope_theta": theta}
    config.max_position_embeddings = trained_length(model.config)  # transformers' dynamic NTK scales from this
    stock = model.get_decoder().rotary_emb
    return type(stock)(config=config).to(stock.inv_freq.device)


def random_cache(model, n_tokens: int, seed: int = 0):
    """A ``DynamicCache`` holding ``n_tokens`` random keys and values per layer: decoding cost does not depend on
    what the cache holds, and building it skips a prefill that would take minutes on a CPU."""
    from transformers import DynamicCache

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, n_tokens, head_dim)
    device, dtype = model.get_input_embeddings().weight.device, model.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        cache.update(keys, values, layer)
    return cache


@dataclass
class Case:
    """One timed thing: ``run`` is timed, ``prepare`` runs untimed right before it; seconds are per ``units``."""

    name: str
    run: Callable[[], object]
    prepare: Callable[[], object] = field(default=lambda: None)
    units: int = 1


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    cases: Sequence[Case], repeats: int, warmup: int = 1, peaks: dict[str, int] | None = None
) -> dict[str, list[float]]:
    """Seconds per unit of each case over ``repeats`` rounds (after ``warmup`` untimed rounds), order rotated.

    With ``peaks`` and a GPU in use, ``peaks[name]`` gets the case's peak ``torch.cuda.max_memory_allocated``.
    """
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for round_index in range(warmup + repeats):
        shift = round_index % len(cases)
        for case in [*cases[shift:], *cases[:shift]]:
            _timed(case, samples if round_index >= warmup else None, peaks)
    return samples


def sandwiched(
    cases: Sequence[Case], repeats: int, warmup: int = 1, peaks: dict[str, int] | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Like :func:`interleaved`, with the first case (the reference) run again between every two others:
    ``ref, a, ref, b, ref, ...``. Each other case's ratio per repeat is its time over the mean of the two reference
    runs right before and after it, which cancels a machine that drifts slower or faster over minutes (as a shared
    one does) instead of pairing runs many minutes apart. Returns (seconds per case, ratios per non-reference case).
    """
    reference, others = cases[0], list(cases[1:])
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    ratios: dict[str, list[float]] = {case.name: [] for case in others}
    for round_index in range(warmup + repeats):
        shift = round_index % max(1, len(others))
        order = others[shift:] + others[:shift]
        record = samples if round_index >= warmup else None
        before = _timed(reference, record, peaks)
        for case in order:
            elapsed = _timed(case, record, peaks)
            after = _timed(reference, record, peaks)
            if record is not None:
                ratios[case.name].append(elapsed / ((before + after) / 2))
            before = after
    return samples, ratios


def _timed(case: Case, samples: dict[str, list[float]] | None, peaks: dict[str, int] | None) -> float:
    """Prepare (untimed) and run ``case`` once; seconds per unit, recorded in ``samples`` when given."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    case.prepare()
    synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    case.run()
    synchronize()
    elapsed = (time.perf_counter() - start) / case.units
    if samples is not None:
        samples[case.name].append(elapsed)
    if cuda and peaks is not None:
        peaks[case.name] = max(peaks.get(case.name, 0), torch.cuda.max_memory_allocated())
    return elapsed


def compare(samples: dict[str, list[float]], name: str, reference: str, ratios: Sequence[float] | None = None) -> dict:
    """Median seconds of ``name`` and its paired ratio to ``reference``: median and min-max over repeats.

    ``ratios``: the per-repeat ratios when the caller paired them itself (:func:`sandwiched`); by default the
    repeats of ``name`` and ``reference`` are paired in order (:func:`interleaved`)."""
    if ratios is None:
        ratios = [a / b for a, b in zip(samples[name], samples[reference], strict=True)]
    return {
        "seconds": statistics.median(samples[name]),
        f"vs_{reference}": statistics.median(ratios),
        f"vs_{reference}_min": min(ratios),
        f"vs_{reference}_max": max(ratios),
    }


def machine() -> dict:
    """Where and when the numbers were taken: the row's machine facts plus the date, the cores and python."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **machine_info(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``columns`` (floats to 4 significant digits, missing as -)."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, args: argparse.Namespace, payload: dict, text: str) -> Path:
    """Print ``text`` and write ``payload`` (plus the machine) as JSON; returns the JSON path."""
    out = args.out or RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "quick": bool(args.quick), "machine": machine(), **payload}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(text)
    print(f"-> {out}")
    return out


def reset_peak_rss() -> int:
    """Reset this process's resident-set high-water mark to its current resident set; returns that, in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        raise SystemExit(f"cannot reset the peak RSS ({error}); the CPU memory benchmark needs Linux >= 4.0") from None
    return _proc_status_bytes("VmRSS")


def peak_rss() -> int:
    """This process's resident-set high-water mark since the last :func:`reset_peak_rss`, in bytes."""
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/self/status has no {key}; the CPU memory benchmark needs Linux")


def in_subprocess(module: str, arguments: Sequence[str]) -> dict:
    """Run ``python -m <module> <arguments>`` from the repository root; it prints one JSON object as its last line."""
    command = [sys.executable, "-m", module, *arguments]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])
