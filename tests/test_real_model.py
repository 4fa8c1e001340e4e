"""The methods on the real embedded model (SmolLM2-135M-Instruct, trained length 8192) and real text.

Slow: one cached model load and two 12k-token forwards on a CPU (a couple of minutes).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import enhance_long
from enhance_long.data import load_documents
from enhance_long.models import load_model

pytestmark = pytest.mark.slow

LENGTH = 8192 + 4096  # 1.5x the trained length: the stock model breaks down in the last thousand tokens


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model({"name": "smollm2_135m", "path": None, "dtype": "float32"}, attention="sdpa")
    docs = load_documents({"name": "canterbury", "source": "canterbury"}, tokenizer, min_tokens=LENGTH)
    ids = next(d for d in docs.docs if "lcet10" in d.name).ids[:LENGTH][None]  # prose: a report on libraries
    return model, ids


@torch.no_grad()
def tail_perplexity(model, ids, tail: int = 1024) -> float:
    hidden = model.model(ids).last_hidden_state[:, -tail - 1 : -1]
    loss = F.cross_entropy(model.lm_head(hidden)[0].float(), ids[0, -tail:])
    return math.exp(loss.item())


def test_consistent_ntk_keeps_smollm2_reading_past_its_trained_length(smollm2):
    model, ids = smollm2
    enhance_long.remove(model)
    inside = model(ids[:, :512]).logits
    stock = tail_perplexity(model, ids)
    enhance_long.apply(model)  # the default: consistent NTK, alpha 2, LogN on
    try:
        # The keys are rotated by the package, not by transformers' rotary: the cos/sin differ from stock by one
        # float32 rounding, which on logits of size ~30 reaches 2e-4 on some CPUs. A wrong base moves them by >0.1.
        torch.testing.assert_close(model(ids[:, :512]).logits, inside, rtol=0, atol=1e-3)
        enhanced = tail_perplexity(model, ids)
    finally:
        enhance_long.remove(model)
    print(f"tail perplexity past 8k: stock {stock:.2f}, consistent_ntk+logn {enhanced:.2f}")
    assert enhanced < 40, f"consistent_ntk perplexity {enhanced:.1f} past 8k on Canterbury text"
    assert enhanced < stock, f"enhanced {enhanced:.1f} should beat stock {stock:.1f} past the trained length"
