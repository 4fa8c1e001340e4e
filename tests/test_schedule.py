"""The two schedules of the consistent methods: ``per_query`` (each query's own length) and ``per_forward`` (the
original enhance-long: a forward's longest length for all its queries and every cached key).

The oracle for ``per_forward`` is written from the original's rule alone: transformers' own dynamic NTK model (the
base of each forward's length) with a cache that keeps keys before RoPE and hands every forward all its keys rotated
at that forward's base. Float64 throughout; the remaining differences (< 1e-7) are float32 angles, which
transformers' rotary embeddings form in float32 whatever the model's dtype.
"""

import pytest
import torch
from conftest import FAMILIES, TRAIN_LEN, tiny_model
from transformers import DynamicCache

import enhance_long
from enhance_long.methods import dynamic_ntk_base, rope_inv_freq

T = TRAIN_LEN
THETA, ALPHA, DIM = 10000.0, 2.0, 16
EXACT = {"rtol": 0, "atol": 1e-6}


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout, float64: ``x * cos + rotate_half(x) * sin``."""
    freqs = positions.double()[:, None] * inv_freq.double()
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class OriginalCache(DynamicCache):
    """The original tool's cache: keys kept before RoPE; each forward attends to all of them rotated at its own base.

    Keys arrive rotated by transformers' dynamic rotary at the forward's base, base(L) with L the forward's longest
    position + 1; they are rotated back and stored unrotated."""

    def __init__(self, config):
        super().__init__(config=config)
        self.unrotated: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        before = self.unrotated.get(layer_idx, key_states[..., :0, :])
        length = before.shape[-2] + key_states.shape[-2]
        inv_freq = rope_inv_freq(dynamic_ntk_base(THETA, ALPHA, length, T, DIM), DIM)
        new = torch.arange(before.shape[-2], length)
        self.unrotated[layer_idx] = torch.cat((before, rotate(key_states, -new, inv_freq)), dim=-2)
        _, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return rotate(self.unrotated[layer_idx], torch.arange(length), inv_freq), values


def transformers_dynamic(family="llama"):
    rope = {"rope_type": "dynamic", "factor": ALPHA, "rope_theta": THETA}
    return tiny_model(family, rope_parameters=rope).double()


def ours(schedule: str, family="llama", layers: int = 2, **knobs):
    model = tiny_model(family, layers=layers).double()
    return enhance_long.apply(
        model, rope="consistent_ntk", alpha=ALPHA, bucket=1, logn=False, schedule=schedule, **knobs
    )


@torch.no_grad()
def decoded(model, tokens: torch.Tensor, prompt: int, cache) -> torch.Tensor:
    """Logits of the prompt forward, then of every token fed one at a time through ``cache``."""
    logits = [model(tokens[:, :prompt], cache=cache).logits]
    logits += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(prompt, tokens.shape[1])]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_forward_single_pass_equals_transformers_dynamic_ntk(family, ids):
    reference, model = transformers_dynamic(family), ours("per_forward", family)
    for n in (T // 2, T, T + 1, 2 * T, 3 * T):
        with torch.no_grad():
            torch.testing.assert_close(model(ids[:, :n]).logits, reference(ids[:, :n]).logits, **EXACT)


@pytest.mark.parametrize("prompt", [T // 2, T + 7])
def test_per_forward_decoding_follows_the_original_rule_at_every_step(prompt, ids):
    reference, model = transformers_dynamic(), ours("per_forward")
    expected = decoded(reference, ids, prompt, OriginalCache(reference.config))
    torch.testing.assert_close(decoded(model, ids, prompt, DynamicCache(config=model.config)), expected, **EXACT)


def test_per_forward_chunked_prefill_follows_the_original_rule(ids):
    reference, model = transformers_dynamic(), ours("per_forward")
    caches = OriginalCache(reference.config), DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, ids.shape[1], 20):
            chunk = ids[:, start : start + 20]
            expected, got = (m(chunk, cache=c).logits for m, c in zip((reference, model), caches, strict=True))
            torch.testing.assert_close(got, expected, **EXACT)


def test_the_schedules_agree_inside_the_trained_length_and_differ_past_it(ids):
    per_query, per_forward = ours("per_query", layers=1), ours("per_forward", layers=1)
    with torch.no_grad():
        torch.testing.assert_close(per_query(ids[:, :T]).logits, per_forward(ids[:, :T]).logits, **EXACT)
        past_query, past_forward = per_query(ids).logits, per_forward(ids).logits
    # with one layer the last query reads the same keys at the same length under both schedules
    torch.testing.assert_close(past_query[:, -1], past_forward[:, -1], **EXACT)
    assert (past_query[:, T:-1] - past_forward[:, T:-1]).abs().max() > 1e-3


def test_per_query_decoding_equals_one_forward_and_per_forward_does_not(ids):
    for schedule, consistent in (("per_query", True), ("per_forward", False)):
        model = ours(schedule)
        stepped = decoded(model, ids, T // 2, DynamicCache(config=model.config))
        with torch.no_grad():
            error = (stepped - model(ids).logits).abs().max().item()
        assert (error < 1e-9) == consistent, (schedule, error)  # per_query: the same computation, fed otherwise


def test_dynamic_yarn_takes_the_schedule_too(ids):
    model = enhance_long.apply(tiny_model().double(), rope="dynamic_yarn", bucket=1, logn=False, schedule="per_forward")
    reference = tiny_model(
        rope_parameters={"rope_type": "yarn", "factor": 3.0, "rope_theta": THETA, "original_max_position_embeddings": T}
    ).double()
    with torch.no_grad():  # one forward of 3T: YaRN with factor 3 for every query
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, **EXACT)


def test_a_bad_schedule_is_refused_in_one_line():
    with pytest.raises(ValueError) as error:
        enhance_long.apply(tiny_model(), rope="consistent_ntk", schedule="per_token")
    message = str(error.value)
    assert (
        "schedule='per_token' is invalid for rope='consistent_ntk'; it must be one of per_query, per_forward" in message
    )
    assert "\n" not in message
