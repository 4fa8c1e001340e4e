"""enhance_long.apply on tiny random models, with Hugging Face as the oracle wherever it has the method."""

import pytest
import torch
from conftest import FAMILIES, TRAIN_LEN, logits, step_by_step_errors, tiny_model
from transformers import DynamicCache

import enhance_long
from enhance_long.methods import logn_scale

T = TRAIN_LEN
STOCK_INSIDE_T = ("none", "dynamic_ntk", "consistent_ntk")  # methods that promise the stock model up to T
BACKENDS = ("eager", "sdpa", "flex_attention")


@pytest.mark.parametrize("rope", STOCK_INSIDE_T)
@pytest.mark.parametrize("logn", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_inside_trained_length_every_method_is_the_stock_model(family, rope, logn, ids):
    model = tiny_model(family)
    stock = logits(model, ids[:, :T])
    enhance_long.apply(model, rope=rope, logn=logn, **({} if rope == "none" else {"bucket": 1}))
    for n in (1, T // 2, T):
        torch.testing.assert_close(logits(model, ids[:, :n]), stock[:, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_ntk_single_pass_equals_transformers_dynamic(family, ids):
    reference = tiny_model(family, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = enhance_long.apply(tiny_model(family), rope="dynamic_ntk", alpha=2.0, logn=False)
    for n in (T + 1, 2 * T, 3 * T):
        torch.testing.assert_close(logits(model, ids[:, :n]), logits(reference, ids[:, :n]), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model, ids), logits(tiny_model(family), ids), atol=1e-3)


@pytest.mark.parametrize("logn", [True, False])
@pytest.mark.parametrize("bucket", [1, 8])
def test_consistent_ntk_cached_generation_equals_full_forward_at_every_step(logn, bucket, ids):
    model = enhance_long.apply(tiny_model(), rope="consistent_ntk", logn=logn, bucket=bucket)
    errors = step_by_step_errors(model, ids, T // 2)
    assert len(errors) == 3 * T - T // 2
    assert max(errors) < 1e-5


def test_dynamic_ntk_and_transformers_dynamic_are_inconsistent_with_the_cache(ids):
    # the bug consistent_ntk fixes: same text, same positions, different logits with and without the cache
    ours = enhance_long.apply(tiny_model(), rope="dynamic_ntk", logn=False)
    builtin = tiny_model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    for model in (ours, builtin):
        errors = step_by_step_errors(model, ids, T // 2)
        assert max(errors[: T // 2]) < 1e-5  # inside T the base never moves
        assert max(errors) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_consistent_ntk_chunked_prefill_equals_one_forward(family, ids):
    model = enhance_long.apply(tiny_model(family), rope="consistent_ntk", bucket=4)
    full = logits(model, ids)
    cache = DynamicCache(config=model.config)
    chunks = [logits(model, ids[:, s : s + 13], cache=cache, use_cache=True) for s in range(0, ids.shape[1], 13)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=2e-5)


def test_consistent_ntk_key_turns_are_kept_within_their_memory_budget(monkeypatch, ids):
    import enhance_long.consistent as consistent

    model = enhance_long.apply(tiny_model(), rope="consistent_ntk", bucket=1, logn=False)
    kept = logits(model, ids)
    held = model._enhance_long.plan.memo["turns"].turns
    # the first segment's keys, then one re-derived key prefix per query past T: each is its own segment at bucket 1
    assert sum(key[3] == 0 for key in held) == ids.shape[1] - TRAIN_LEN + 1
    one = max(t.numel() * t.element_size() for t in held.values())
    monkeypatch.setattr(consistent, "ROTATION_MEMO_BYTES", 3 * one)  # room for a few turns only
    bounded = logits(model, ids)
    memo = model._enhance_long.plan.memo["turns"]
    assert 0 < len(memo.turns) < len(held) and memo.bytes <= 3 * one
    torch.testing.assert_close(bounded, kept, rtol=0, atol=0)


def test_consistent_ntk_generate_matches_greedy_full_forwards(ids):
    model = enhance_long.apply(tiny_model(), rope="consistent_ntk", bucket=1)
    prompt = ids[:, : T - 4]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=2 * T, do_sample=False, min_new_tokens=2 * T)
        tokens = prompt
        for _ in range(2 * T):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, tokens)


def test_logn_scales_queries_past_train_len_like_an_independent_query_hook(ids):
    """Oracle: the stock model with each layer's q_proj output multiplied by log(i)/log(T)."""
    reference = tiny_model(attention="eager")
    positions = torch.arange(ids.shape[1])
    scale = logn_scale(positions, T)[None, :, None]
    for layer in reference.model.layers:
        layer.self_attn.q_proj.register_forward_hook(lambda module, args, out: out * scale[:, : out.shape[1]])
    model = enhance_long.apply(tiny_model(attention="eager"), rope="none", logn=True)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model, ids), logits(tiny_model(attention="eager"), ids), atol=1e-4)


def test_logn_len_overrides_the_trained_length(ids):
    model = enhance_long.apply(tiny_model(), rope="none", logn=True, logn_len=T // 2)
    stock = tiny_model()
    torch.testing.assert_close(logits(model, ids[:, : T // 2]), logits(stock, ids[:, : T // 2]))
    assert not torch.allclose(logits(model, ids[:, :T]), logits(stock, ids[:, :T]), atol=1e-4)


@pytest.mark.parametrize(
    "rope,knobs",
    [
        ("none", {}),
        ("linear", {"factor": 3.0}),
        ("ntk", {"alpha": 4.0}),
        ("dynamic_ntk", {"alpha": 2.0}),
        ("consistent_ntk", {"alpha": 2.0, "bucket": 1}),
        ("consistent_ntk", {"alpha": 2.0, "bucket": 16}),
        ("yarn", {"factor": 4.0}),
    ],
)
@pytest.mark.parametrize("logn", [True, False])
def test_every_backend_computes_the_same_logits(rope, knobs, logn, ids):
    outputs = {}
    for backend in BACKENDS:
        model = enhance_long.apply(tiny_model(attention=backend), rope=rope, logn=logn, **knobs)
        outputs[backend] = logits(model, ids)
        assert model.config._attn_implementation == f"enhance_long_{backend}"
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(outputs[backend], outputs["eager"], rtol=0, atol=2e-5)


def test_static_methods_change_logits_beyond_nothing_else(ids):
    stock = logits(tiny_model(), ids)
    for rope, knobs in (("linear", {"factor": 2.0}), ("ntk", {"alpha": 2.0}), ("yarn", {"factor": 2.0})):
        assert not torch.allclose(logits(enhance_long.apply(tiny_model(), rope=rope, **knobs), ids), stock, atol=1e-4)


def test_linear_equals_transformers_linear_scaling(ids):
    reference = tiny_model(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    model = enhance_long.apply(tiny_model(), rope="linear", factor=4.0, logn=False)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)


def test_yarn_equals_transformers_yarn(ids):
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": T}
    reference = tiny_model(rope_parameters=rope)
    model = enhance_long.apply(tiny_model(), rope="yarn", factor=4.0, logn=False)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rope", ["linear", "ntk", "dynamic_ntk", "consistent_ntk", "yarn"])
def test_remove_restores_bit_identical_stock_logits(rope, ids):
    model = tiny_model()
    stock = logits(model, ids)
    enhance_long.apply(model, rope=rope, logn=True)
    enhance_long.apply(model, rope=rope, logn=False)  # re-apply replaces, never stacks
    assert enhance_long.describe(model)["logn"] is False
    enhance_long.remove(model)
    assert torch.equal(logits(model, ids), stock)
    assert model.config._attn_implementation == "sdpa"
    assert enhance_long.describe(model) is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rope": "rerope_typo"}, "unknown rope method 'rerope_typo'; choose one of none, linear"),
        ({"rope": "ntk", "alpha": 0}, "alpha=0 is invalid for rope='ntk'; it must be a number > 0"),
        ({"rope": "dynamic_ntk", "alpha": -1.0}, "alpha=-1.0 is invalid"),
        ({"rope": "linear", "factor": 0.0}, "factor=0.0 is invalid"),
        (
            {"rope": "consistent_ntk", "bucket": 0},
            "bucket=0 is invalid for rope='consistent_ntk'; it must be an integer >= 1",
        ),
        ({"rope": "none", "alpha": 2.0}, "rope='none' does not take alpha; it takes no knobs"),
        ({"rope": "ntk", "train_len": 0}, "train_len=0 is invalid; it must be an integer > 1"),
        ({"rope": "ntk", "train_len": -5}, "train_len=-5 is invalid"),
        ({"rope": "none", "logn_len": 1}, "logn_len=1 is invalid"),
    ],
)
def test_bad_values_raise_one_line_errors_and_patch_nothing(kwargs, message, ids):
    model = tiny_model()
    stock = logits(model, ids)
    with pytest.raises(ValueError) as error:
        enhance_long.apply(model, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert enhance_long.describe(model) is None
    assert torch.equal(logits(model, ids), stock)


def test_unsupported_model_type_is_refused_and_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported; enhance_long supports llama, mistral"):
        enhance_long.apply(model)
    assert not hasattr(model, "_enhance_long")


def test_model_without_rotary_embedding_is_refused():
    model = tiny_model()
    del model.model.rotary_emb
    with pytest.raises(ValueError, match="has no rotary embedding"):
        enhance_long.apply(model)


def test_model_with_its_own_rope_scaling_is_refused_for_methods_but_not_for_logn():
    model = tiny_model(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="model already uses rope_type='linear'"):
        enhance_long.apply(model, rope="ntk")
    enhance_long.apply(model, rope="none", logn=True)


def test_flash_attention_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r'pip install "enhance-long\[flash\]"'):
        enhance_long.apply(model)
    assert model.config._attn_implementation == "flash_attention_2"


def test_consistent_ntk_refuses_a_static_cache(ids):
    from transformers import StaticCache

    model = enhance_long.apply(tiny_model(), rope="consistent_ntk")
    cache = StaticCache(config=model.config, max_cache_len=4 * T)
    with pytest.raises(ValueError, match="re-rotates a DynamicCache, got StaticCache"):
        model(ids, cache=cache, use_cache=True)


def test_import_has_no_side_effects_and_auto_patches_from_pretrained(tmp_path, ids):
    import subprocess
    import sys

    tiny_model().save_pretrained(tmp_path)
    script = f"""
import enhance_long
from transformers import AutoModelForCausalLM
plain = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
assert enhance_long.describe(plain) is None
import enhance_long.auto
patched = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
info = enhance_long.describe(patched)
assert info["rope"] == "consistent_ntk" and info["alpha"] == 2.0 and info["logn"] is True, info
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the reference, on purpose
def test_the_flex_probe_accepts_a_right_kernel_and_reports_a_wrong_one():
    from torch.nn.attention.flex_attention import flex_attention

    from enhance_long.attention import flex_kernel_error

    reference = torch._dynamo.disable(flex_attention)  # the unfused flex: slow, exact
    assert flex_kernel_error("cpu", reference) is None
    assert flex_kernel_error("cpu", lambda *a, **k: reference(*a, **k) * 1.01) > 1e-3


def test_apply_refuses_flex_where_its_compiled_kernel_is_wrong(monkeypatch):
    import enhance_long.attention

    monkeypatch.setattr(enhance_long.attention, "flex_kernel_error", lambda device_type: 0.99)
    model = tiny_model()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError) as error:
        enhance_long.apply(model)
    message = str(error.value)
    assert message.startswith("attention=flex_attention: torch ") and "off by 0.99 on this cpu" in message
    assert "use attention=sdpa or attention=eager" in message and "\n" not in message
    assert not hasattr(model, "_enhance_long")  # refused before anything was patched
