"""Reports from result rows: tables, CSV, plots, merging folders without duplicates, the command line."""

import csv
import json

import pytest

from enhance_long.report import main, write_report
from enhance_long.results import ResultStore, cell_key, load_results
from enhance_long.tables import labels
from enhance_long.tasks.passkey import passkey_table
from enhance_long.tasks.perplexity import perplexity_table


def ppl_rows(method, rope, ctx, ppl, logn=False, **extra):
    key = cell_key({"method": method, **extra}, {"ctx": ctx})
    buckets = [
        {"start": 0, "end": ctx // 2, "ppl": ppl / 2, "tokens": 10},
        {"start": ctx // 2, "end": ctx, "ppl": ppl, "tokens": 10},
    ]
    base = {"task": "perplexity", "model": "m", "method": method, "rope": rope, "logn": logn, "ctx": ctx, "key": key}
    base.update(extra)
    return [
        {**base, "doc": "d1", "ppl": ppl, "tokens": 20, "buckets": buckets},
        {**base, "doc": "all", "ppl": ppl, "tokens": 20, "buckets": buckets},
    ]


def passkey_row(method, ctx, depth, accuracy):
    key = cell_key({"method": method}, {"ctx": ctx, "depth": depth})
    return {
        "task": "passkey",
        "model": "m",
        "method": method,
        "rope": "x",
        "ctx": ctx,
        "depth": depth,
        "key": key,
        "trials": 4,
        "accuracy": accuracy,
    }


def store(directory, rows):
    s = ResultStore(directory)
    for key in dict.fromkeys(r["key"] for r in rows):
        s.put(key, [r for r in rows if r["key"] == key])


def test_perplexity_table_is_methods_by_lengths_baseline_first():
    rows = ppl_rows("ntk(alpha=2)", "ntk", 4096, 9.0) + ppl_rows("none", "none", 4096, 8.5)
    rows += ppl_rows("ntk(alpha=2)", "ntk", 8192, 10.25) + ppl_rows("none", "none", 8192, 1234.5)
    table = perplexity_table(rows).splitlines()
    assert table[2:] == [
        "| method | 4096 | 8192 |",
        "|---|---|---|",
        "| none | 8.50 | 1.23e+03 |",
        "| ntk(alpha=2) | 9.00 | 10.25 |",
    ]


def test_labels_show_only_the_settings_that_vary():
    rows = ppl_rows("none", "none", 64, 2.0, attention="sdpa", settings={"mode": "sliding", "stride": None})
    rows += ppl_rows("none", "none", 64, 3.0, attention="sdpa", settings={"mode": "cached", "stride": None})
    assert sorted(set(labels(rows).values())) == ["none, mode=cached", "none, mode=sliding"]


def test_passkey_table_averages_depths():
    rows = [passkey_row("a", 4096, 0.0, 1.0), passkey_row("a", 4096, 1.0, 0.5), passkey_row("a", 8192, 0.0, 0.0)]
    assert passkey_table(rows).splitlines()[-1] == "| a | 75% | 0% |"


def test_write_report_writes_csv_table_and_plots(tmp_path):
    rows = ppl_rows("none", "none", 64, 5.0) + ppl_rows("none", "none", 128, 7.0) + [passkey_row("a", 64, 0.5, 1.0)]
    written = write_report(rows, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["passkey_heatmap.png", "ppl_by_position.png", "ppl_vs_length.png", "results.csv", "table.md"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0])[:4] == ["task", "model", "method", "rope"]
    assert json.loads(table[0]["buckets"])[0]["tokens"] == 10
    assert not list(tmp_path.glob(".*.tmp"))


def test_folders_merge_with_one_copy_per_cell(tmp_path):
    shared = ppl_rows("none", "none", 64, 5.0)
    store(tmp_path / "a", shared + ppl_rows("ntk", "ntk", 64, 4.0))
    store(tmp_path / "b", shared)  # the same cell measured by a job that differs only in an ignored knob
    rows = load_results([tmp_path])
    assert len(rows) == 4 and sorted({r["method"] for r in rows}) == ["none", "ntk"]


def test_command_line_rebuilds_a_report(tmp_path, capsys):
    store(tmp_path / "a", ppl_rows("none", "none", 64, 5.0))
    store(tmp_path / "b", ppl_rows("ntk", "ntk", 64, 4.0))
    assert main([str(tmp_path)]) == 0
    assert "| ntk | 4.00 |" in capsys.readouterr().out and (tmp_path / "results.csv").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "b")])  # several inputs need --out
    assert "--out" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "ppl_vs_length.png").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
