"""Perplexity at a context length: sliding windows over long documents, scored from hidden states in chunks.

Protocol (the one the long-context papers use): a window of ``ctx`` tokens starts every ``stride`` tokens
(``stride`` defaults to ``ctx``: non-overlapping windows); only full windows are used, so every scored token sees
a window of exactly ``ctx`` tokens. The first window scores all its tokens, later ones only the ``stride`` tokens
no earlier window scored, so each token of the covered span is scored once. ``max_windows`` caps the windows
per length, taken round-robin over the documents (the default, 1, keeps ``python run.py`` to a few minutes)::

    window k covers [k*stride, k*stride + ctx)
    scored label positions (within the window): 1 .. ctx-1 for k = 0, ctx-stride .. ctx-1 after
    ppl = exp(sum of NLL / tokens scored)

The loss is computed from the decoder's final hidden states, ``chunk`` positions at a time through ``lm_head``
(never a ``ctx x vocab`` logits tensor), accumulated in float64. It is also split by the position of the scored
token inside its window (``buckets`` equal ranges of [0, ctx)), which shows *where* a method breaks.

Scoring several lengths in one job shares forwards where that is exact: unless the method's frequencies follow the
length of the whole forward (``dynamic_ntk``, transformers' own ``dynamic``, ``schedule=per_forward``), a window's
losses on its first ``n`` tokens are those of the window of ``n`` tokens at the same start, so one forward at the
longest length scores every shorter window with that start (``max_windows=1``: one forward per job instead of one per length). Rows say so in
``from_ctx``.

Side measures on the same windows, in the same rows: at the lengths of ``tail_at``, the last ``tail_tokens`` tokens of
each window are scored again in a window of their own (``tail_ppl`` with the whole window before them,
``tail_alone_ppl`` alone: their ratio says whether the method uses the far context); at the lengths of ``cached_at``
each window is also fed through the KV cache, ``chunk`` tokens per forward (``cached_ppl``); with
``cached_for=dynamic`` only for the methods whose frequencies follow the length, the others scoring the same either
way to rounding (tested), which their rows say with ``cached_same`` instead of a forward that changes no number.

``mode=cached`` feeds each window through a ``DynamicCache`` instead: a ``prefill`` forward, then ``chunk`` tokens
per forward. Static methods and ``consistent_ntk`` (every key read at the current base) score the same either
way; ``dynamic_ntk`` (keys keep the base they were written with) does not.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from enhance_long.patch import cache_dependent, prefix_exact
from enhance_long.plots import figure, legend, length_plot, save, styles, zoom_in
from enhance_long.tables import describe_rows, grid, grid_table, labels, ordered_labels, perplexity_text
from enhance_long.tasks.base import Task, TaskEnv, require_positive


@dataclass
class PerplexityConfig:
    """``task=perplexity`` (``conf/task/perplexity.yaml`` comments every key)."""

    name: str = "perplexity"
    mode: str = "sliding"  # sliding | cached
    stride: int | None = None  # None = ctx (non-overlapping windows)
    max_windows: int | None = 1  # per length, round-robin over documents; None = every full window
    min_tokens: int | None = None  # documents shorter than max(ctx, min_tokens) are skipped
    buckets: int = 8  # position buckets over [0, ctx)
    chunk: int = 1024  # positions per lm_head call, and per forward in mode=cached
    prefill: int | None = None  # mode=cached: tokens in the first forward; None = chunk
    tail_at: list[int] = field(default_factory=list)  # lengths whose windows' last tail_tokens are also scored alone
    tail_tokens: int = 8192  # the tail the "helps" ratio compares: read with the whole window vs in its own window
    cached_at: list[int] = field(default_factory=list)  # lengths whose windows are also scored through the KV cache
    cached_for: str = "all"  # all, or dynamic: only where the frequencies follow the length (patch.cache_dependent)


def window_starts(n_tokens: int, ctx: int, stride: int) -> list[int]:
    """Start offsets of the full windows of ``ctx`` tokens, ``stride`` apart, in a document of ``n_tokens``."""
    return list(range(0, n_tokens - ctx + 1, stride))


def spread_windows(starts: Sequence[Sequence[int]], budget: int | None) -> list[tuple[int, int, int]]:
    """``(document, window index, start)`` to score: all windows, or ``budget`` of them taken round-robin over
    the documents (window 0 of each document, then window 1, ...) so a small budget still samples every document.
    """
    order = sorted(
        ((doc, index, start) for doc, doc_starts in enumerate(starts) for index, start in enumerate(doc_starts)),
        key=lambda item: (item[1], item[0]),
    )
    chosen = order if budget is None else order[:budget]
    return sorted(chosen)


def first_scored(window_index: int, ctx: int, stride: int) -> int:
    """The first label position a window scores: 1 in the first window, else the first not scored before."""
    return 1 if window_index == 0 else ctx - stride


@dataclass
class NLLTotals:
    """Summed negative log-likelihood and token counts, overall and per position bucket over [0, ctx)."""

    ctx: int
    buckets: int
    nll: float = 0.0
    tokens: int = 0
    bucket_nll: list[float] = field(default_factory=list)
    bucket_tokens: list[int] = field(default_factory=list)
    sides: dict[str, list] = field(default_factory=dict)  # name -> [NLL sum, tokens] of a side measure (tail, cached)

    def __post_init__(self):
        self.bucket_nll = self.bucket_nll or [0.0] * self.buckets
        self.bucket_tokens = self.bucket_tokens or [0] * self.buckets

    def add(self, nll: torch.Tensor, positions: torch.Tensor) -> None:
        """Add per-token NLL values scored at these label positions (within the window)."""
        nll = nll.double().cpu()
        index = (positions.cpu() * self.buckets) // self.ctx
        self.nll += float(nll.sum())
        self.tokens += nll.numel()
        sums = torch.zeros(self.buckets, dtype=torch.float64).index_add_(0, index, nll)
        counts = torch.bincount(index, minlength=self.buckets)
        for b in range(self.buckets):
            self.bucket_nll[b] += float(sums[b])
            self.bucket_tokens[b] += int(counts[b])

    def add_side(self, name: str, nll: torch.Tensor) -> None:
        """Add NLL values of a side measure: other tokens or another way of feeding them (``<name>_ppl`` in rows)."""
        self._add_side_sums(name, float(nll.double().sum()), nll.numel())

    def _add_side_sums(self, name: str, nll: float, tokens: int) -> None:
        total = self.sides.setdefault(name, [0.0, 0])
        total[0] += nll
        total[1] += tokens

    def merge(self, other: NLLTotals) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        for b in range(self.buckets):
            self.bucket_nll[b] += other.bucket_nll[b]
            self.bucket_tokens[b] += other.bucket_tokens[b]
        for name, (nll, tokens) in other.sides.items():
            self._add_side_sums(name, nll, tokens)

    def row(self) -> dict:
        """``ppl``, ``tokens``, ``nll`` and the per-bucket breakdown (``ppl`` None for an empty bucket)."""
        edges = [self.ctx * b // self.buckets for b in range(self.buckets + 1)]
        return {
            "ppl": math.exp(self.nll / self.tokens),
            "tokens": self.tokens,
            "nll": self.nll,
            "buckets": [
                {
                    "start": edges[b],
                    "end": edges[b + 1],
                    "ppl": math.exp(self.bucket_nll[b] / self.bucket_tokens[b]) if self.bucket_tokens[b] else None,
                    "tokens": self.bucket_tokens[b],
                }
                for b in range(self.buckets)
            ],
            **{f"{name}_ppl": math.exp(nll / tokens) for name, (nll, tokens) in self.sides.items()},
            **{f"{name}_tokens": tokens for name, (_, tokens) in self.sides.items()},
        }


def _chunked_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token NLL of ``targets`` given ``hidden`` (one row per target), ``chunk`` rows per lm_head call."""
    device = head.weight.device
    pieces = []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk].to(device)).float()
        pieces.append(F.cross_entropy(logits, targets[start : start + chunk].to(device), reduction="none"))
    return torch.cat(pieces)


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, first: int, chunk: int) -> torch.Tensor:
    """NLL of label positions ``first .. len(ids)-1`` of one window, from a single forward."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = model.get_input_embeddings().weight.device
    hidden = decoder(input_ids=ids[None].to(device), use_cache=False).last_hidden_state[0]
    return _chunked_nll(head, hidden[first - 1 : -1], ids[first:], chunk)


@torch.inference_mode()
def window_nll_cached(model, ids: torch.Tensor, first: int, chunk: int, prefill: int) -> torch.Tensor:
    """Like :func:`window_nll`, but the window goes through a ``DynamicCache``: ``prefill`` tokens, then ``chunk``."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = model.get_input_embeddings().weight.device
    cache = DynamicCache(config=model.config)
    # transformers 5.x renamed the decoder's ``past_key_values`` argument to ``cache``; use whichever it takes
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    ends = [min(prefill, len(ids)), *range(prefill + chunk, len(ids), chunk), len(ids)]
    pieces, start = [], 0
    for end in sorted(set(ends)):
        hidden = decoder(input_ids=ids[None, start:end].to(device), use_cache=True, **{cache_arg: cache})
        hidden = hidden.last_hidden_state[0]
        # hidden row i (position start+i) predicts label position start+i+1
        lo, hi = max(first, start + 1), min(end, len(ids) - 1)
        if lo <= hi:
            pieces.append(_chunked_nll(head, hidden[lo - 1 - start : hi - start], ids[lo : hi + 1], chunk))
        start = end
    return torch.cat(pieces)


class Perplexity(Task):
    name = "perplexity"
    schema = PerplexityConfig

    def check(self, cfg: Any, ctxs: Sequence[int]) -> None:
        if cfg.mode not in ("sliding", "cached"):
            raise ValueError(f"task.mode={cfg.mode} is unknown; choose sliding or cached (e.g. task.mode=cached)")
        require_positive("task.stride", cfg.stride, "task.stride=1024", integer=True)
        if cfg.stride is not None and cfg.stride > min(ctxs):
            raise ValueError(
                f"task.stride={cfg.stride} is larger than ctx={min(ctxs)}, which would skip tokens; "
                f"use task.stride<={min(ctxs)}, or null for stride=ctx"
            )
        require_positive("task.max_windows", cfg.max_windows, "task.max_windows=4", integer=True)
        require_positive("task.min_tokens", cfg.min_tokens, "task.min_tokens=16384", integer=True)
        require_positive("task.buckets", cfg.buckets, "task.buckets=8", integer=True)
        require_positive("task.chunk", cfg.chunk, "task.chunk=1024", integer=True)
        require_positive("task.prefill", cfg.prefill, "task.prefill=4096", integer=True)
        if cfg.buckets > min(ctxs):
            raise ValueError(f"task.buckets={cfg.buckets} exceeds ctx={min(ctxs)}; use task.buckets<={min(ctxs)}")
        for knob in ("tail_at", "cached_at"):
            for length in cfg[knob]:
                if length not in ctxs:
                    raise ValueError(
                        f"task.{knob} has {length}, which is not one of the lengths {list(ctxs)}; add it to ctxs or drop it"
                    )
        for length in cfg.tail_at:
            if not 2 <= cfg.tail_tokens < length:
                raise ValueError(
                    f"task.tail_tokens={cfg.tail_tokens} must be between 2 and the tail_at length {length} "
                    f"(exclusive), e.g. task.tail_tokens={length // 4}"
                )
        if cfg.cached_for not in ("all", "dynamic"):
            raise ValueError(
                f"task.cached_for={cfg.cached_for} is unknown; choose all or dynamic (e.g. task.cached_for=dynamic)"
            )
        if cfg.mode == "cached" and cfg.cached_at:
            raise ValueError(
                "task.cached_at scores windows through the cache beside mode=sliding; with mode=cached drop it"
            )

    def cells(self, cfg, ctxs: Sequence[int]) -> list[dict]:
        self.check(cfg, ctxs)
        return [{"ctx": int(ctx)} for ctx in ctxs]

    def header(self, cfg: Any) -> list[str]:
        budget = f"max_windows={cfg.max_windows} per length" if cfg.max_windows else "every full window"
        lines = [f"  windows: stride={cfg.stride or 'ctx'}, {budget}, mode={cfg.mode}"]
        if cfg.max_windows:
            lines.append("  (a sample that keeps a CPU run short; task.max_windows=null scores every window)")
        return lines

    def prepare(self, env: TaskEnv, cells: Sequence[dict]) -> None:
        """Lengths to share forwards between (see the module docstring), and no losses kept from the last method."""
        env.cache["perplexity.pending"] = sorted({int(cell["ctx"]) for cell in cells})
        env.cache["perplexity.losses"] = {}

    def windows_for(self, env: TaskEnv, ctx: int):
        """The corpus for ``ctx`` and its windows ``(doc, window index, start)``."""
        cfg = env.cfg
        corpus = self.documents(env, max(ctx, cfg.min_tokens or 0))  # one-line ValueError when none is long enough
        stride = cfg.stride or ctx
        return corpus, spread_windows([window_starts(len(d.ids), ctx, stride) for d in corpus.docs], cfg.max_windows)

    def host(self, env: TaskEnv, ctx: int, doc: str, start: int) -> int:
        """The longest pending length (``ctx`` itself at least) that scores a window of ``doc`` at ``start`` in the
        same forward as this window's own, when the method allows sharing; else ``ctx``."""
        pending = env.cache.get("perplexity.pending", [])
        if env.cfg.mode != "sliding" or not any(other > ctx for other in pending):
            return ctx
        if not prefix_exact(env.model):
            return ctx
        for longer in sorted((other for other in pending if other > ctx), reverse=True):
            corpus, windows = self.windows_for(env, longer)
            if any(corpus.docs[d].name == doc and s == start for d, _, s in windows):
                return longer
        return ctx

    def losses(self, env: TaskEnv, ids: torch.Tensor, ctx: int, doc: str, start: int, longest: int) -> torch.Tensor:
        """NLL of label positions ``1 .. ctx-1`` of the window of ``doc`` at ``start``, read off the forward of
        ``longest`` tokens from the same start (kept for the shorter pending lengths that share it)."""
        kept = env.cache.setdefault("perplexity.losses", {})
        if (doc, start, longest) not in kept:
            if longest != ctx:
                corpus, _ = self.windows_for(env, longest)
                ids = next(d.ids for d in corpus.docs if d.name == doc)[start : start + longest]
            kept[(doc, start, longest)] = window_nll(env.model, ids, 1, env.cfg.chunk)
        return kept[(doc, start, longest)][: ctx - 1]

    def documents(self, env: TaskEnv, min_tokens: int):
        """The corpus with documents of at least ``min_tokens`` tokens, loaded once per job and length floor."""
        from enhance_long.data import load_documents

        memo = ("perplexity.documents", min_tokens)
        if memo not in env.cache:
            env.cache[memo] = load_documents(env.data_cfg, env.tokenizer, min_tokens=min_tokens)
        return env.cache[memo]

    def measure(self, env: TaskEnv, cell: dict) -> list[dict]:
        cfg, ctx = env.cfg, cell["ctx"]
        stride = cfg.stride or ctx
        corpus, windows = self.windows_for(env, ctx)
        totals = [NLLTotals(ctx, cfg.buckets) for _ in corpus.docs]
        hosts = set()
        cached = ctx in cfg.cached_at and (cfg.cached_for == "all" or cache_dependent(env.model))
        same = {"cached_same": True} if ctx in cfg.cached_at and not cached else {}
        bar = tqdm(windows, desc=f"perplexity ctx={ctx}", unit="window", disable=not env.progress, leave=False)
        for doc_index, window_index, start in bar:
            doc = corpus.docs[doc_index]
            ids = doc.ids[start : start + ctx]
            first = first_scored(window_index, ctx, stride)
            if cfg.mode == "cached":
                nll = window_nll_cached(env.model, ids, first, cfg.chunk, cfg.prefill or cfg.chunk)
            else:
                host = self.host(env, ctx, doc.name, start)
                if host != ctx:  # label the bar by the forward it runs, which the shorter lengths then read
                    bar.set_description(f"perplexity ctx={host} (for ctx={ctx} too)")
                nll = self.losses(env, ids, ctx, doc.name, start, host)[first - 1 :]
                hosts.add(host)
            totals[doc_index].add(nll, torch.arange(first, ctx))
            if cached:
                totals[doc_index].add_side("cached", window_nll_cached(env.model, ids, first, cfg.chunk, cfg.chunk))
            if ctx in cfg.tail_at:  # the same tokens with the whole window before them, and in a window of their own
                tail = cfg.tail_tokens
                totals[doc_index].add_side("tail", nll[-(tail - 1) :])
                totals[doc_index].add_side("tail_alone", window_nll(env.model, ids[ctx - tail :], 1, cfg.chunk))
            bar.set_postfix(doc=corpus.docs[doc_index].name, ppl=f"{math.exp(nll.double().mean()):.2f}")
        rows, total = [], NLLTotals(ctx, cfg.buckets)
        counts = Counter(doc_index for doc_index, _, _ in windows)
        for doc_index, (doc, doc_totals) in enumerate(zip(corpus.docs, totals, strict=True)):
            if counts[doc_index]:
                total.merge(doc_totals)
                rows.append({**cell, "doc": doc.name, "windows": counts[doc_index], **doc_totals.row(), **same})
        rows.append(
            {**cell, "doc": "all", "docs": len(rows), "windows": len(windows), "skipped": corpus.skipped, **total.row()}
            | same
        )
        shared = max(hosts, default=ctx)
        return [{**row, "from_ctx": shared} for row in rows] if shared != ctx else rows

    def summary(self, rows: Sequence[dict]) -> list[dict]:
        return [row for row in rows if row.get("doc", "all") == "all"]

    def brief(self, rows: Sequence[dict]) -> str:
        row = self.summary(rows)[-1]
        return f"ppl={row['ppl']:.3f} over {row['tokens']} tokens"

    def table(self, rows: Sequence[dict]) -> str:
        return perplexity_table(rows)

    def plots(self, rows: Sequence[dict], out_dir: Path) -> list[Path]:
        rows = self.summary(rows)
        if not rows:
            return []
        return [plot_ppl_vs_length(rows, Path(out_dir) / "ppl_vs_length.png"), *plot_ppl_by_position(rows, out_dir)]


TASK = Perplexity()


def perplexity_table(rows: Sequence[dict]) -> str:
    """Methods x lengths of the aggregate perplexity (lower is better)."""
    rows = TASK.summary(rows)
    title = f"### Perplexity (lower is better; {describe_rows(rows)})"
    return grid_table(rows, "ppl", title, cell=lambda values: perplexity_text(values[-1]))


def plot_ppl_vs_length(rows: Sequence[dict], path: Path) -> Path:
    order, ctxs, cells = grid(rows, "ppl")
    series = {label: [(c, cells[(label, c)][-1], None) for c in ctxs if (label, c) in cells] for label in order}
    return length_plot(series, path, "perplexity", f"Perplexity vs length ({describe_rows(rows)})")


def plot_ppl_by_position(
    rows: Sequence[dict], out_dir: Path, order: Sequence[str] = (), zoom: float = 0.0
) -> list[Path]:
    """Perplexity per position bucket, one panel per length (``ppl_by_position.png``). ``order`` fixes each label's
    line style (the board passes its row order, so a method looks the same in every plot; labels not in it follow);
    ``zoom`` > 1 adds under each panel the same lines cut to within ``zoom`` x the lowest bucket."""
    rows = [row for row in rows if row.get("buckets")]
    if not rows:
        return []
    label_of = labels(rows)
    present = ordered_labels(rows, label_of)
    style = styles(list(dict.fromkeys([*order, *present])))
    drawn = [label for label in style if label in present]  # the legend in ``order`` too
    ctxs = sorted({row["ctx"] for row in rows})
    fig, axes = figure(len(ctxs), 2 if zoom > 1 else 1)
    for column, ctx in enumerate(ctxs):
        lowest = math.inf
        for label in drawn:
            matching = [r for r in rows if r["ctx"] == ctx and label_of[r["key"]] == label]
            if not matching:
                continue
            buckets = [b for b in matching[-1]["buckets"] if b["ppl"] is not None]
            lowest = min([lowest, *(b["ppl"] for b in buckets)])
            for ax in axes[:, column]:
                ax.plot(
                    [b["end"] for b in buckets],
                    [b["ppl"] for b in buckets],
                    label=label,
                    **{**style[label], "marker": "."},
                )
        for ax in axes[:, column]:
            ax.set(yscale="log", xlabel="position in window (bucket end, tokens)", ylabel="perplexity")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][column].set_title(f"ctx={ctx}")
        if zoom > 1 and lowest < math.inf:
            zoom_in(axes[1][column], lowest, zoom, f"ctx={ctx}: ")
    legend(fig, axes[0][0], len(drawn))
    return [save(fig, Path(out_dir) / "ppl_by_position.png")]
