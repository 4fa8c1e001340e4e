"""RULER's scoring (``scripts/eval/synthetic/constants.py``, ``scripts/eval/evaluate.py``) and the effective length.

    string_match_all(["The numbers are 12 and 34."], [["12", "34", "56"]])   # 66.67: share of references found
    string_match_part(["It is Paris."], [["Paris", "France"]])               # 100.0: any reference found
    effective_length({4096: 90.1, 8192: 86.0, 16384: 70.2}, 85.6)            # 8192

A reference counts as found when it occurs in the prediction, both lower-cased; predictions are first stripped and
their control characters (``\\x00``-``\\x1f``) turned into newlines, as ``evaluate.py``'s ``postprocess_pred``
does. Task scores are x100, rounded to two decimals as RULER rounds them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """``evaluate.py``'s ``postprocess_pred``: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _found(prediction: str, references: Sequence[str]) -> list[float]:
    if not references:
        raise ValueError("a RULER sample has no reference answers; every sample needs at least one")
    lowered = prediction.lower()
    return [1.0 if reference.lower() in lowered else 0.0 for reference in references]


def match_all(prediction: str, references: Sequence[str]) -> float:
    """One sample of ``string_match_all``: the share of the references found in the prediction (0 to 1)."""
    found = _found(prediction, references)
    return sum(found) / len(found)


def match_part(prediction: str, references: Sequence[str]) -> float:
    """One sample of ``string_match_part``: 1 if any reference is found in the prediction, else 0."""
    return max(_found(prediction, references))


def _mean_x100(per_sample: Sequence[float]) -> float:
    if not per_sample:
        raise ValueError("no predictions to score; a RULER cell needs at least one sample")
    return round(sum(per_sample) / len(per_sample) * 100, 2)


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's metric for niah, vt, cwe and fwe: the mean share of references found, x100, rounded to 2."""
    return _mean_x100([match_all(p, r) for p, r in zip(predictions, references, strict=True)])


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's metric for qa: the share of predictions containing any reference, x100, rounded to 2."""
    return _mean_x100([match_part(p, r) for p, r in zip(predictions, references, strict=True)])


# scripts/eval/synthetic/constants.py: each generator's metric_fn, with its per-sample score.
METRICS = {
    "niah": (string_match_all, match_all),
    "variable_tracking": (string_match_all, match_all),
    "common_words_extraction": (string_match_all, match_all),
    "freq_words_extraction": (string_match_all, match_all),
    "qa": (string_match_part, match_part),
}


def effective_length(averages: Mapping[int, float], threshold: float) -> int | None:
    """The longest length up to which the average score stays at or above ``threshold`` (RULER: 85.6,
    Llama-2-7B's score at 4k): lengths are walked from the shortest and the walk stops at the first one below it.
    None when even the shortest falls below."""
    longest = None
    for length in sorted(averages):
        if averages[length] < threshold:
            break
        longest = length
    return longest
