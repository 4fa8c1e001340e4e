"""YaRN frequencies (Peng et al. 2023), reused from transformers rather than rewritten.

YaRN interpolates the low frequencies by ``factor``, keeps the high frequencies (those that rotate more than
``beta_fast`` times over the trained length) as they are, ramps linearly in between, and scales attention by
``0.1 * ln(factor) + 1`` (applied to cos and sin, so to both query and key).
"""

from __future__ import annotations

import copy

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def yarn_frequencies(
    config, factor: float, train_len: int, beta_fast: float, beta_slow: float, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of YaRN with ``factor`` over ``train_len``, via transformers' own function."""
    yarn_config = copy.deepcopy(config)
    yarn_config.rope_parameters = {
        "rope_type": "yarn",
        "rope_theta": config.rope_parameters["rope_theta"],
        "partial_rotary_factor": config.rope_parameters.get("partial_rotary_factor", 1.0),
        "factor": float(factor),
        "original_max_position_embeddings": int(train_len),
        "beta_fast": float(beta_fast),
        "beta_slow": float(beta_slow),
    }
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS["yarn"](yarn_config, device)
    return inv_freq, float(attention_scaling)
