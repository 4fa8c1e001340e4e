"""Attention temperatures: the logit factor some methods give each query.

Applied as a factor on the query (as LogN is), so fused kernels keep working, and taken from each query's own
position, so a token scores the same in one forward as through the cache, token by token or in chunks.

* Dual Chunk Attention (ChunkLlama) scales cos and sin of queries and keys by ``m = 1 + c ln(L / T)`` once
  ``L > T``, i.e. logits by m²:

      factor(i) = (1 + c ln((i + 1) / T))^2   if i + 1 > T,   else 1

  The official code takes one ``L`` per forward (cached + new tokens, the largest seen in the process), so all
  queries of a long forward share it and cached keys keep the factor of the step that wrote them; here ``L = i + 1``
  per query. ``c`` is 0.05 in ``chunkllama_attn_replace.py`` (``get_mscale``, HKUNLP/ChunkLlama 2add4d7) and 0.1 in
  its ``flash_decoding_chunkllama.py`` and in vLLM. Its T is ``max_position_embeddings``; here the trained length.
* STRING (``string_for_llama.py``: ``replace_with_string`` and ``RotaryEmbedding._set_cos_sin_cache``, HKUNLP/STRING
  216cc2f) scales cos and sin by ``a = 1 + 0.1 ln 2`` always: logits by ``a^2``, at every length.

Both officially scale queries and keys by m; here the query alone by m², the same logits up to one rounding.
"""

from __future__ import annotations

import torch


def chunk_attention_scale(positions: torch.Tensor, train_len: int, coefficient: float) -> torch.Tensor | None:
    """Per-query logit factors ``(1 + c ln((i + 1) / T))^2`` past T for 0-based ``positions``; None where all are 1."""
    if coefficient == 0 or int(positions.max()) + 1 <= train_len:
        return None
    length = positions.to(torch.float32) + 1.0
    m = 1.0 + coefficient * torch.log(length / train_len)
    return torch.where(length > train_len, m * m, torch.ones_like(m))


def constant_attention_scale(positions: torch.Tensor, factor: float) -> torch.Tensor | None:
    """The logit factor ``factor^2`` for every query (queries and keys both scaled by ``factor``); None for 1."""
    if factor == 1:
        return None
    return torch.full(positions.shape, factor * factor, dtype=torch.float32, device=positions.device)
