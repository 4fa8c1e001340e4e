"""The leaderboard table: intervals, the helps ratio, the cached column, passkey with Wilson intervals, RULER."""

import math

import pytest

from enhance_long.board import Board, interval, main, short_label, sweep_plan, wilson, write_board
from enhance_long.results import RESULTS, ResultStore, cell_key, read_rows

CONSISTENT = {"rope": "consistent_ntk", "knobs": {"alpha": 2.0, "bucket": 256, "schedule": "per_query"}}
ORIGINAL = {"rope": "consistent_ntk", "knobs": {"alpha": 2.0, "bucket": 1, "schedule": "per_forward"}, "logn": True}
STOCK = {"rope": "none", "knobs": {}}


def ppl_rows(variant, ctx, window_ppls, **sides):
    key = cell_key({"v": str(variant)}, {"ctx": ctx})
    base = {"task": "perplexity", "model": "m", "method": "x", "logn": False, **variant, "ctx": ctx, "key": key}
    docs = [
        {**base, "doc": f"d{i}", "ppl": p, **{k: v[i] for k, v in sides.items()}} for i, p in enumerate(window_ppls)
    ]
    pooled = math.exp(sum(math.log(p) for p in window_ppls) / len(window_ppls))
    return [*docs, {**base, "doc": "all", "ppl": pooled, **{k: sum(v) / len(v) for k, v in sides.items()}}]


def passkey_rows(variant, ctx, found):
    return [
        {
            "task": "passkey",
            "model": "m",
            "logn": False,
            **variant,
            "ctx": ctx,
            "depth": d,
            "correct": c,
            "trials": 1,
            "accuracy": c,
            "key": cell_key({"v": str(variant)}, {"ctx": ctx, "depth": d}),
        }  # fmt: skip
        for d, c in zip((0.1, 0.5, 0.9), found, strict=True)
    ]


def ruler_rows(variant, scores):
    return [
        {
            "task": "ruler",
            "model": "m",
            "logn": False,
            **variant,
            "ctx": ctx,
            "ruler_task": task,
            "score": score,
            "key": cell_key({"v": str(variant)}, {"ctx": ctx, "ruler_task": task}),
        }  # fmt: skip
        for (ctx, task), score in scores.items()
    ]


def rows():
    out = ppl_rows(STOCK, 8192, [18.0, 20.0]) + ppl_rows(STOCK, 16384, [900.0, 1100.0], cached_same=[True, True])
    out += ppl_rows(CONSISTENT, 8192, [18.0, 20.0]) + ppl_rows(CONSISTENT, 16384, [17.0, 19.0], cached_ppl=[17.0, 19.0])
    out += ppl_rows(CONSISTENT, 32768, [16.0, 18.0], tail_ppl=[15.0, 16.0], tail_alone_ppl=[20.0, 20.0])
    out += passkey_rows(STOCK, 16384, [0, 0, 1]) + passkey_rows(CONSISTENT, 16384, [1, 1, 1])
    out += ruler_rows(CONSISTENT, {(8192, "niah_single_1"): 100.0, (16384, "niah_single_1"): 80.0})
    out += ruler_rows(ORIGINAL, {(8192, "niah_single_1"): 90.0})
    return out


def test_short_labels_name_the_knobs_away_from_their_defaults():
    assert short_label(STOCK) == "none"
    assert short_label(CONSISTENT) == "consistent_ntk"
    assert short_label(ORIGINAL) == "consistent_ntk(bucket=1,schedule=per_forward)+logn"


def test_intervals_are_two_standard_errors_of_the_log_and_wilson_for_counts():
    low, high = interval([10.0, 40.0])  # logs differ by ln 4: se = ln(4) / 2
    assert math.isclose(low, 20.0 / 4) and math.isclose(high, 20.0 * 4)
    assert interval([7.0]) is None
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    assert wilson(1, 2) == pytest.approx((0.0945, 0.9055), abs=1e-4)  # the textbook value for 1/2 at 95%


def test_the_board_has_a_line_per_method_and_a_column_per_measure():
    board = Board(rows())
    assert board.methods == ["none", "consistent_ntk", "consistent_ntk(bucket=1,schedule=per_forward)+logn"]
    lines = board.table().splitlines()
    assert lines[0] == (
        "| method | ppl 8k | ppl 16k | ppl 32k | helps (tail ppl ratio) | ppl 16k cached | passkey 16k | RULER 8k | "
        "RULER 16k | effective length |"
    )
    consistent = lines[3].split(" | ")
    assert consistent[1].startswith("18.97 [") and consistent[4].startswith("0.775 [")  # sqrt(15*16)/20
    assert consistent[5] == "18.00" and consistent[6] == "3/3 [0.44, 1.00]"  # the pooled row's cached_ppl
    assert consistent[7:] == ["100.0", "80.0", "8192 |"]  # 80 < 85.6 at 16k
    assert lines[2].split(" | ")[5] == "="  # left out as exact (task.cached_for=dynamic)
    assert lines[2].split(" | ")[6].startswith("1/3 [")
    assert lines[4].split(" | ")[1] == "-"  # no perplexity rows for that method


def test_write_board_and_the_command_line(tmp_path, capsys):
    store = ResultStore(tmp_path / "sweep" / "job")
    for key in dict.fromkeys(r["key"] for r in rows()):
        store.put(key, [r for r in rows() if r["key"] == key])
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "board")]) == 0
    assert "| consistent_ntk |" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "board").iterdir()}
    assert {"board.md", "results.csv", "ppl_vs_length.png", "ppl_bands.png", "passkey_heatmap.png"} <= names
    assert "ruler_heatmap.png" in names
    assert write_board(rows(), tmp_path / "again")[0].name == "results.csv"
    assert read_rows(tmp_path / "board" / RESULTS) == rows()  # what the runner's reuse reads back, unchanged
    # a resumed sweep that has copied only some of the committed cells so far: the committed board keeps the rest
    # and a new cell: the board's files keep the committed rows where they were and append the new one
    last = rows()[-1]["key"]
    resumed = ResultStore(tmp_path / "resumed" / "job")
    new = passkey_rows(ORIGINAL, 16384, [1, 0, 1])
    for key in (last, new[0]["key"]):
        resumed.put(key, [r for r in [*rows(), *new] if r["key"] == key])
    assert main([str(tmp_path / "resumed"), str(tmp_path / "board"), "--out", str(tmp_path / "board")]) == 0
    assert read_rows(tmp_path / "board" / RESULTS) == [*rows(), new[0]]


def bucketed(variant, ctx, per_doc):
    """Perplexity rows whose windows carry position ranges: ``per_doc`` lists each document's range perplexities."""
    key = cell_key({"v": str(variant)}, {"ctx": ctx})
    base = {"task": "perplexity", "model": "m", "logn": False, **variant, "ctx": ctx, "key": key}
    docs = []
    for i, ppls in enumerate(per_doc):
        ranges = [{"start": j * 100, "end": (j + 1) * 100, "ppl": p, "tokens": 100} for j, p in enumerate(ppls)]
        docs.append({**base, "doc": f"d{i}", "ppl": math.exp(sum(map(math.log, ppls)) / len(ppls)), "buckets": ranges})
    pooled = math.exp(sum(math.log(d["ppl"]) for d in docs) / len(docs))
    ranges = [{**b, "ppl": math.exp(sum(math.log(d["buckets"][j]["ppl"]) for d in docs) / len(docs))}
              for j, b in enumerate(docs[0]["buckets"])]  # fmt: skip
    return [*docs, {**base, "doc": "all", "ppl": pooled, "buckets": ranges}]


def test_the_paired_table_resolves_a_constant_gap_that_the_window_intervals_cannot():
    best = [[10.0, 20.0], [30.0, 60.0]]  # the two windows differ 3x: their own intervals are wide
    rows = bucketed(STOCK, 8192, best)
    rows += bucketed(CONSISTENT, 8192, [[p * 1.1 for p in doc] for doc in best])  # 10% worse on every token range
    rows += bucketed(ORIGINAL, 8192, [[10.0 * 1.3, 20.0 * 0.8], [30.0 * 1.1, 60.0 * 0.95]])  # as often better as worse
    board = Board(rows)
    assert board.best(8192) == "none"
    ratio, (low, high) = board.paired("consistent_ntk", "none", 8192)
    assert ratio == pytest.approx(1.1) and low == pytest.approx(1.1) and high == pytest.approx(1.1)
    window_low, window_high = board.perplexity("consistent_ntk", 8192)[1]
    assert window_low < 20.0 < 30.0 < window_high  # the per-row interval overlaps the best row's figure
    lines = board.paired_table().splitlines()
    assert lines[0] == "| method | ppl 8k / best |"
    assert lines[2:] == [
        "| none | best |",
        "| consistent_ntk | 1.100 [1.100, 1.100] |",
        f"| consistent_ntk(bucket=1,schedule=per_forward)+logn | {lines[4].split(' | ')[1]}",
    ]
    assert lines[4].endswith(" ~ |")  # ratios 1.3, 0.8, 1.1, 0.95: the interval holds 1
    assert board.paired("consistent_ntk", "none", 16384) is None  # no rows at that length
    report = board.report()
    assert report.index("| method | ppl 8k |") < report.index("| method | ppl 8k / best |")


def test_the_board_plots_where_each_method_breaks_in_its_longest_window(tmp_path):
    rows = bucketed(STOCK, 8192, [[10.0, 20.0]]) + bucketed(STOCK, 16384, [[10.0, 900.0]])
    rows += bucketed(CONSISTENT, 16384, [[10.0, 11.0]])
    board = Board(rows)
    assert {(r["method"], r["ctx"]) for r in board.longest_windows()} == {("none", 16384), ("consistent_ntk", 16384)}
    names = [p.name for p in write_board(rows, tmp_path)]
    assert "ppl_by_position.png" in names and "ppl_vs_length.png" in names


def test_the_positions_table_gives_each_range_of_the_longest_windows_pooled_over_them():
    rows = bucketed(STOCK, 8192, [[10.0, 20.0]]) + bucketed(STOCK, 16384, [[10.0, 900.0], [40.0, 100.0]])
    rows += bucketed(CONSISTENT, 16384, [[10.0, 11.0], [10.0, 11.0]])
    table = Board(rows).positions_table()
    assert table.splitlines()[0] == "| method | 0-100 | 100-200 |"
    assert "| none | 20.0 | 300.0 |" in table  # exp of the mean log over the two windows: sqrt(10*40), sqrt(900*100)
    assert "| consistent_ntk | 10.0 | 11.0 |" in table
    assert "Perplexity by position in the 16k windows" in Board(rows).report()
    assert Board(passkey_rows(STOCK, 16384, [0, 0, 1])).positions_table() is None


def test_the_wall_table_counts_each_cell_once_and_sums_rows_and_tasks():
    stock = [{**r, "seconds": 120.0} for r in ppl_rows(STOCK, 8192, [18.0, 20.0])]  # 3 rows of one cell: 2 min
    stock += [{**r, "seconds": 60.0} for r in passkey_rows(STOCK, 16384, [0, 0, 1])]  # 3 cells: 3 min
    mine = [{**r, "seconds": 600.0} for r in ppl_rows(CONSISTENT, 8192, [18.0, 20.0])]
    table = Board(stock + mine).wall_table()
    assert table.splitlines()[0] == "| method | perplexity min | passkey min | row min |"
    assert "| none | 2 | 3 | 5 |" in table and "| consistent_ntk | 10 | - | 10 |" in table
    assert "| all rows | 12 | 3 | 15 (0.2 h) |" in table
    assert (
        "Wall time" in Board(stock).report() and "Wall time" not in Board(passkey_rows(STOCK, 16384, [1] * 3)).report()
    )


def test_the_board_says_how_much_of_the_planned_sweep_it_holds(tmp_path):
    rows = bucketed(STOCK, 8192, [[10.0, 20.0]]) + bucketed(STOCK, 16384, [[10.0, 900.0]])
    rows += bucketed(CONSISTENT, 8192, [[10.0, 11.0]]) + passkey_rows(STOCK, 16384, [0, 0, 1])
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      task: perplexity,passkey,ruler\n      variant: none,consistent_ntk,yarn\n"
    )
    plan = sweep_plan([tmp_path])
    assert plan == {"tasks": ["perplexity", "passkey", "ruler"], "rows": 3}
    assert Board(rows).coverage(plan) == (
        "Rows measured: perplexity 2 of 3 (partial: consistent_ntk); passkey 1 of 3; ruler 0 of 3."
    )
    assert Board(rows).coverage() == "Rows measured: perplexity 2 (partial: consistent_ntk); passkey 1."
    write_board(rows, tmp_path / "board", plan)
    assert (tmp_path / "board" / "board.md").read_text().startswith("Rows measured: perplexity 2 of 3")
    (tmp_path / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      rope.alpha: range(1,4)\n")
    assert sweep_plan([tmp_path]) is None  # a range lists no values to count
    assert sweep_plan([tmp_path / "board"]) is None  # no multirun.yaml there


def test_of_rows_equal_to_rounding_the_first_is_the_best():
    rows = bucketed(CONSISTENT, 8192, [[10.0, 20.0 * (1 - 1e-9)]]) + bucketed(STOCK, 8192, [[10.0, 20.0]])
    rows += bucketed(ORIGINAL, 8192, [[10.0, 21.0]])
    assert Board(rows).best(8192) == "none"  # stock first, though consistent_ntk is lower by rounding
    # every range 1e-5 lower through other float32 kernels: rounding, not a better model, though the interval is tight
    kernels = bucketed({"rope": "dynamic_yarn", "knobs": {}}, 8192, [[10.0 * (1 - 1e-5), 20.0 * (1 - 1e-5)]])
    board = Board(bucketed(STOCK, 8192, [[10.0, 20.0]]) + kernels + bucketed(ORIGINAL, 8192, [[10.2, 20.4]]))
    assert board.best(8192) == "none"
    cells = dict(line.strip("| ").split(" | ") for line in board.paired_table().splitlines()[2:])
    assert cells["none"] == "best" and cells["dynamic_yarn"] == "1.000 [1.000, 1.000] ~"
    assert cells["consistent_ntk(bucket=1,schedule=per_forward)+logn"] == "1.020 [1.020, 1.020]"  # 2% apart: resolved
    assert Board(rows).best(16384) is None


def test_a_row_the_sweep_has_not_finished_is_marked_partial_in_the_table():
    scores = {(8192, "niah_single_1"): 100.0, (8192, "niah_single_2"): 50.0}
    every = passkey_rows(STOCK, 16384, [0, 0, 1]) + ruler_rows(STOCK, scores)
    unfinished = passkey_rows(CONSISTENT, 16384, [1, 1, 1])[:1] + ruler_rows(CONSISTENT, dict(list(scores.items())[:1]))
    board = Board(every + unfinished)
    assert board.partial("passkey", "consistent_ntk") and board.partial("ruler", "consistent_ntk")
    assert not board.partial("passkey", "none") and not board.partial("ruler", "none")
    lines = board.table().splitlines()
    assert lines[2] == "| none | 1/3 [0.06, 0.79] | 75.0 | below 8192 |"
    assert lines[3] == "| consistent_ntk | 1/1 [0.21, 1.00] (partial) | 100.0 (partial) | 8192 or more (partial) |"
    assert board.coverage() == "Rows measured: passkey 2 (partial: consistent_ntk); ruler 2 (partial: consistent_ntk)."


def test_the_board_says_on_which_machine_each_row_was_measured():
    stock = [{**r, "machine": "cpu A (AVX512)"} for r in passkey_rows(STOCK, 16384, [0, 0, 1])]
    text = Board(stock + passkey_rows(CONSISTENT, 16384, [1, 1, 1])).machines()
    assert text.splitlines()[2:] == [
        "* cpu A (AVX512): passkey none",
        "* not recorded (rows from before they carried it): passkey consistent_ntk",
    ]
    assert Board(stock).report().rstrip().endswith("* cpu A (AVX512): passkey none")


def test_many_lines_get_their_legend_beside_the_axes_and_their_bands_a_panel_each(tmp_path):
    from enhance_long.plots import BANDS_TOGETHER, LEGEND_INSIDE, _sparse_label, band_panels, figure, legend

    assert [_sparse_label(v) for v in (14.0, 20.0, 40.0, 50.0, 90.0, 300.0)] == ["14", "20", "", "50", "", "300"]

    many = LEGEND_INSIDE + 1
    for entries, (panels, rows) in ((LEGEND_INSIDE, (1, 1)), (many, (1, 1)), (many, (2, 1)), (many, (1, 2))):
        fig, axes = figure(panels, rows)
        for i in range(entries):
            axes[0][0].plot([0, 1], [i, i], label=f"m{i}")
        width = fig.get_size_inches()[0]
        legend(fig, axes[0][0], entries)
        outside = entries > LEGEND_INSIDE
        assert (axes[0][0].get_legend() is None) == outside and len(fig.legends) == outside
        assert (fig.get_size_inches()[0] > width) == (outside and panels == 1)  # room made beside one column
    series = {f"m{i}": [(8192, 10.0 + i, (9.0, 12.0 + i)), (16384, 11.0 + i, None)] for i in range(BANDS_TOGETHER + 1)}
    series["empty"] = []
    band_panels(series, tmp_path / "bands.png", "ppl", reference="m0")
    assert (tmp_path / "bands.png").stat().st_size > 0


def test_positions_plot_keeps_the_boards_colours_and_zooms(tmp_path, monkeypatch):
    """The board's perplexity-by-position plot draws each method in the style it has in ppl_vs_length (the board's
    row order, not the order the rows came in), and its zoomed panel cuts the axis to the good methods."""
    from enhance_long.plots import styles
    from enhance_long.tasks import perplexity

    figures = []
    monkeypatch.setattr(perplexity, "save", lambda fig, path: figures.append(fig) or path)
    buckets = [{"end": 4096, "ppl": 20.0}, {"end": 8192, "ppl": 30.0}]
    rows = [
        {"method": m, "key": m, "ctx": 8192, "buckets": [{**b, "ppl": b["ppl"] * (1 + i)} for b in buckets]}
        for i, m in enumerate(("b", "a"))
    ]
    perplexity.plot_ppl_by_position(rows, tmp_path, order=["a", "c", "b"], zoom=1.6)
    (fig,) = figures
    top, zoomed = fig.axes[0], fig.axes[1]
    style = styles(["a", "c", "b"])
    assert [(line.get_label(), line.get_color()) for line in top.lines] == [
        (label, style[label]["color"]) for label in ("a", "b")
    ]
    assert zoomed.get_ylim() == pytest.approx((20.0 / 1.05, 32.0))
    assert [text.get_text() for text in top.get_legend().get_texts()] == ["a", "b"]


def test_the_heatmaps_have_a_panel_per_method_in_the_tables_order(tmp_path, monkeypatch):
    """Passkey and RULER panels follow the board's rows, whatever order their cells were measured in (here the
    original tool's passkey and RULER came before consistent_ntk's)."""
    from enhance_long.tasks import passkey, ruler

    panels = {}
    for module in (passkey, ruler):
        monkeypatch.setattr(module, "heatmaps", lambda got, path, *_: panels.setdefault(path.name, got) and path)
    board_rows = ppl_rows(STOCK, 8192, [18.0, 20.0]) + ppl_rows(CONSISTENT, 8192, [18.0, 20.0])
    board_rows += ppl_rows(ORIGINAL, 8192, [18.0, 20.0])
    board_rows += passkey_rows(ORIGINAL, 16384, [1, 0, 1]) + passkey_rows(CONSISTENT, 16384, [1, 1, 1])
    board_rows += ruler_rows(ORIGINAL, {(8192, "niah_single_1"): 90.0})
    board_rows += ruler_rows(CONSISTENT, {(8192, "niah_single_1"): 100.0})
    write_board(board_rows, tmp_path)
    methods = Board(board_rows).methods
    assert methods[1] == "consistent_ntk"
    expected = [methods[1], methods[2]]
    assert [panel.title for panel in panels["passkey_heatmap.png"]] == expected
    assert [panel.title.splitlines()[0] for panel in panels["ruler_heatmap.png"]] == expected


def test_the_readme_quotes_the_committed_board():
    """Every interval the README's leaderboard section quotes (perplexity, helps, paired ratios, passkey) is one the
    committed board.md prints, so a re-rendered board cannot leave the README on stale figures."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    board = (root / "docs" / "leaderboard" / "board.md").read_text()
    section = readme[readme.index("### The leaderboard") : readme.index("### The default run")]
    quoted = re.findall(r"\d+(?:\.\d+|/\d+) \[\d+\.\d+, \d+\.\d+\]", section)
    assert len(quoted) > 40, "the README's leaderboard section moved: point this test at it"
    stale = sorted({q for q in quoted if q not in board})
    assert not stale, f"README figures not in docs/leaderboard/board.md: {stale}; copy them again from board.md"
