"""Shared fixtures and helpers: tiny random models of every supported family and a byte-level tokenizer, built in
code (no downloads); logits and step-by-step decoding errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from enhance_long.attention import flex_kernel_error
from enhance_long.models import byte_tokenizer

TRAIN_LEN = 32  # trained context of the tiny models; tests run to 3x this

# The remapping and bounded methods with windows and chunks small enough that a tiny model at 3-4x TRAIN_LEN
# crosses every view (shared by the batch and precision tests).
SMALL_VIEWS = [
    ("self_extend", {"group": 3, "window": 8}),
    ("rerope", {"window": 12}),
    ("leaky_rerope", {"window": 12, "leak": 4.0}),
    ("dual_chunk", {"chunk_size": 12, "local_window": 4, "mscale": 0.1}),
    ("string", {"shifted_offset": 10, "local_value": 3}),
    ("lm_infinite", {"window": 12, "n_global": 3}),
    ("attention_sink", {"n_sink": 2, "window": 10}),
]
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(
    family: str = "llama",
    attention: str = "sdpa",
    rope_parameters: dict | None = None,
    seed: int = 0,
    layers: int = 2,
    **config,
):
    """A random model (2 layers by default) of ``family`` with GQA (4 query heads, 2 key/value heads), fp32, eval mode.

    ``config`` overrides further config fields (a tokenizer's ``vocab_size`` and special token ids, the trained
    length ``max_position_embeddings``)."""
    settings = {
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": TRAIN_LEN,
        "rope_parameters": rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_window": None,
        "attn_implementation": attention,
    }
    if attention == "flex_attention":
        skip_where_flex_is_broken()
    config = AutoConfig.for_model(family, **{**settings, **config})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def skip_where_flex_is_broken(device: str = "cpu") -> None:
    """Skip a flex case where torch's compiled flex kernel is wrong on this machine (``apply`` refuses it there);
    the reason says by how much, so a skipped flex suite is visible in the report."""
    error = flex_kernel_error(device)
    if error is not None:
        pytest.skip(f"torch {torch.__version__}'s compiled flex attention is off by {error:.2g} on this {device}")


@pytest.fixture
def ids():
    return torch.randint(0, 97, (1, 3 * TRAIN_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level tokenizer (one token per byte, BOS first): exact lengths are easy to reason about."""
    return byte_tokenizer()


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def step_by_step_errors(model, ids, prompt_len):
    """Max |cached logits - full-forward logits| at each step of token-by-token decoding from a prompt."""
    cache = DynamicCache(config=model.config)
    errors = []
    with torch.no_grad():
        model(ids[:, :prompt_len], cache=cache, use_cache=True)
        for t in range(prompt_len, ids.shape[1]):
            step = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
            full = model(ids[:, : t + 1]).logits[:, -1]
            errors.append((step - full).abs().max().item())
    return errors
