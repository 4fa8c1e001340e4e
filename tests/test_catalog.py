"""The method catalogue: the one description of every method, which apply, the config schema and the README read."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import enhance_long
from enhance_long.methods.catalog import CATALOG, Knob, Method, Rope, methods_table, register_method, rope_inv_freq

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_methods_table_is_the_catalogue():
    assert methods_table() in README.read_text(), "re-render the README table with methods_table()"


def test_methods_lists_every_catalogue_method_with_its_defaults():
    assert list(enhance_long.METHODS) == list(CATALOG)
    assert enhance_long.METHODS["consistent_ntk"] == {"alpha": 2.0, "bucket": 256, "schedule": "per_query"}
    assert enhance_long.METHODS["none"] == {}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rope": "yarn", "factor": 0.5}, "factor=0.5 is invalid for rope='yarn'; it must be a number >= 1"),
        ({"rope": "linear", "factor": 0.9}, "factor=0.9 is invalid for rope='linear'"),
        ({"rope": "ntk_by_parts", "factor": 0.5}, "factor=0.5 is invalid for rope='ntk_by_parts'"),
        (
            {"rope": "leaky_rerope", "leak": 0.5},
            "leak=0.5 is invalid for rope='leaky_rerope'; it must be a number >= 1",
        ),
        ({"rope": "consistent_ntk", "bucket": True}, "bucket=True is invalid"),
        ({"rope": "yarn", "beta_fast": 1.0, "beta_slow": 32.0}, "beta_fast=1.0 must be above beta_slow=32.0"),
    ],
)
def test_values_that_shrink_the_reach_or_cannot_work_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as error:
        enhance_long.apply(tiny_model(), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def halved(basis, knobs, length):
    return Rope(rope_inv_freq(basis.base, basis.dim) / knobs["divisor"])


def test_a_method_registered_from_outside_runs_like_a_built_in_one(ids):
    method = Method("halved_test", (Knob("divisor", 2.0, "positions divided by it", minimum=1.0),), halved)
    register_method(method)
    try:
        model = enhance_long.apply(tiny_model(), rope="halved_test", logn=False)
        reference = enhance_long.apply(tiny_model(), rope="linear", factor=2.0, logn=False)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
        assert enhance_long.describe(model)["divisor"] == 2.0
        with pytest.raises(ValueError, match="divisor=0.5 is invalid for rope='halved_test'"):
            enhance_long.apply(tiny_model(), rope="halved_test", divisor=0.5)
    finally:
        del CATALOG["halved_test"]


def test_a_knob_name_means_one_kind_of_value_across_the_catalogue():
    clash = Method("clash_test", (Knob("window", 1.5, "not tokens"),))  # built-ins take an integer window
    with pytest.raises(ValueError, match="knob 'window' of method 'clash_test' differs in type or bounds"):
        register_method(clash)
    assert "clash_test" not in CATALOG
