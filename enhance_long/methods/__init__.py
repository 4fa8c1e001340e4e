"""The math of each method as small pure functions, testable without a model."""

from enhance_long.methods.logn import logn_scale
from enhance_long.methods.ntk import dynamic_ntk_base, ntk_base, rope_inv_freq, scheduled_length
from enhance_long.methods.rotation import as_pairs, rotate_in_place, rotated, rotation_delta, turned
from enhance_long.methods.yarn import yarn_frequencies

__all__ = [
    "as_pairs",
    "dynamic_ntk_base",
    "logn_scale",
    "ntk_base",
    "rope_inv_freq",
    "rotate_in_place",
    "rotated",
    "rotation_delta",
    "scheduled_length",
    "turned",
    "yarn_frequencies",
]
