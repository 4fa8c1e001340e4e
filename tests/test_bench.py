"""The benchmarks' timing protocol, on a fake clock: sandwiched pairing cancels a machine that drifts."""

import pytest
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
