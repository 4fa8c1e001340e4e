"""YaRN's relatives beyond transformers' own yarn: NTK-by-parts (YaRN without its temperature) and dynamic YaRN
(YaRN with factor = length/T per query, consistent like consistent_ntk). Hugging Face's YaRN is the oracle."""

import pytest
import torch
from conftest import TRAIN_LEN, logits, step_by_step_errors, tiny_model

import enhance_long

T = TRAIN_LEN
THETA = 10000.0


def yarn_reference(factor: float, layers: int = 2, attention_factor: float | None = None):
    rope = {"rope_type": "yarn", "factor": factor, "rope_theta": THETA, "original_max_position_embeddings": T}
    if attention_factor is not None:
        rope["attention_factor"] = attention_factor
    return tiny_model(rope_parameters=rope, layers=layers)


def test_ntk_by_parts_is_yarn_without_its_temperature(ids):
    model = enhance_long.apply(tiny_model(), rope="ntk_by_parts", factor=4.0, logn=False)
    torch.testing.assert_close(logits(model, ids), logits(yarn_reference(4.0, attention_factor=1.0), ids))


def test_dynamic_yarn_is_the_stock_model_inside_the_trained_length(ids):
    model = enhance_long.apply(tiny_model(), rope="dynamic_yarn", logn=False, bucket=1)
    torch.testing.assert_close(logits(model, ids[:, :T]), logits(tiny_model(), ids[:, :T]), rtol=0, atol=1e-5)


def test_dynamic_yarn_gives_each_query_yarn_at_its_own_length(ids):
    # with one layer, the output at position i depends only on that query's frequencies and the embeddings
    model = enhance_long.apply(tiny_model(layers=1), rope="dynamic_yarn", logn=False, bucket=1)
    ours = logits(model, ids)
    for position in (T, 2 * T - 1, 3 * T - 1):
        reference = logits(yarn_reference((position + 1) / T, layers=1), ids[:, : position + 1])
        torch.testing.assert_close(ours[:, position], reference[:, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("rope", ["dynamic_yarn", "consistent_ntk"])
def test_consistent_methods_match_one_layer_oracles_at_every_position(rope, ids):
    model = enhance_long.apply(tiny_model(layers=1), rope=rope, logn=False, bucket=1)
    ours = logits(model, ids)
    for position in (T + 3, 2 * T + 5):
        length = position + 1
        reference = (
            yarn_reference(length / T, layers=1)
            if rope == "dynamic_yarn"
            else tiny_model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": THETA}, layers=1)
        )
        torch.testing.assert_close(ours[:, position], logits(reference, ids[:, :length])[:, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("bucket", [1, 8])
def test_dynamic_yarn_cached_generation_equals_full_forward(bucket, ids):
    model = enhance_long.apply(tiny_model(), rope="dynamic_yarn", bucket=bucket)
    assert max(step_by_step_errors(model, ids, T // 2)) < 1e-5
