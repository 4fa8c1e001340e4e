"""The benchmarks' timing protocol, on a fake clock: sandwiched pairing cancels a machine that drifts; and each
benchmark's wiring, run as its own command on the tiny random model (``--quick``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import bench.common as common
from bench.common import Case, compare, keep_layers, sandwiched


class DriftingClock:
    """Each run costs ``work * speed`` fake seconds; the machine gets 10% slower with every run."""

    def __init__(self):
        self.now, self.speed = 0.0, 1.0

    def perf_counter(self):
        return self.now

    def work(self, amount):
        self.now += amount * self.speed
        self.speed *= 1.1


def test_sandwiched_ratios_cancel_a_drifting_machine(monkeypatch):
    clock = DriftingClock()
    monkeypatch.setattr(common.time, "perf_counter", clock.perf_counter)
    cases = [Case(name, lambda w=work: clock.work(w)) for name, work in (("stock", 1.0), ("a", 1.5), ("b", 1.0))]
    samples, ratios = sandwiched(cases, repeats=3, warmup=1)
    assert len(samples["stock"]) == 3 * 3 and len(samples["a"]) == 3  # stock before, between and after
    # a run between two stock runs sees the mean of their speeds: off by the drift's curvature only (< 0.5%)
    assert compare(samples, "a", "stock", ratios["a"])["vs_stock"] == pytest.approx(1.5, rel=5e-3)
    assert compare(samples, "b", "stock", ratios["b"])["vs_stock"] == pytest.approx(1.0, rel=5e-3)
    assert compare(samples, "stock", "stock", ratios.get("stock"))["vs_stock"] == 1.0


def test_keep_layers_cuts_the_decoder_and_refuses_a_bad_count():
    model = tiny_model(layers=3)
    keep_layers(model, 2)
    assert len(model.get_decoder().layers) == model.config.num_hidden_layers == 2
    with pytest.raises(SystemExit, match="--layers=5 is invalid; give an integer from 1 to 2"):
        keep_layers(model, 5)


ROOT = Path(__file__).resolve().parents[1]
WIRING = {  # one repeat, the shortest lengths: these check that the scripts run and report, not their numbers
    "prefill": "--lengths 256 --methods consistent_ntk self_extend --logn off",
    "attention": "--methods consistent_ntk self_extend",
    "decode": "",
    "gpu": "--device cpu --methods none consistent_ntk --lengths 256 --steps 8",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WIRING))
def test_each_benchmark_runs_on_the_tiny_model_and_writes_its_table(tmp_path, name):
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"bench.{name}", "--quick", "--repeats", "1", "--out", str(out)]
    done = subprocess.run([*command, *WIRING[name].split()], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = [row for key in ("rows", "prefill", "decode") for row in result.get(key, [])]
    cases = {row["case"] for row in rows}
    if name == "decode":
        assert {"stock", "builtin_dynamic"} <= cases and any(c.startswith("consistent_ntk") for c in cases)
    else:
        assert {"stock", "consistent_ntk"} <= cases
    assert all(row.get("seconds", row.get("ms_per_token", 1)) > 0 for row in rows)
    if name == "gpu":  # on a CPU the pieces run the CPU kernel, and the script says so
        assert result["settings"]["fused_pieces"] is True
        assert "fused pieces on cpu: True" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: bench.gpu runs instead of skipping")
def test_the_gpu_benchmark_skips_cleanly_without_cuda():
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped, no CUDA device" in done.stdout
